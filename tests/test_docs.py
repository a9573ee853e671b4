"""The README is a front door that stays short, every link in it and in docs/ leads somewhere, and every committed
table is what the collector makes from the committed results.csv."""
import re
import shutil

import pytest

from conftest import REPO
from normsweep import files
from normsweep.collect import rebuild_from_csv

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# the baseline each committed table was made with (its README says so)
TABLES = {"reference": "BatchNorm", "batch_size": "BatchNorm batch_size=64 optim.lr=0.015 optim.max_lr=0.015",
          "fashion": "BatchNorm data.augment=True", "gpu": None,
          **{f"post_pool/{norm}": f"{label} norm.after_pool=True"
             for norm, label in (("bn", "BatchNorm"), ("gn", "GroupNorm"), ("ln", "LayerNorm"))}}


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) < 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:|#", target):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: {target}"


@pytest.mark.parametrize("study", TABLES)
def test_a_committed_table_is_what_the_collector_makes_of_its_committed_csv(tmp_path, study):
    shutil.copy(REPO / "docs" / "results" / study / files.RESULTS_CSV, tmp_path / files.RESULTS_CSV)
    rebuild_from_csv(tmp_path / files.RESULTS_CSV, TABLES[study])
    committed = REPO / "docs" / "results" / study
    assert (tmp_path / files.RESULTS_MD).read_text() == (committed / files.RESULTS_MD).read_text()
    assert (tmp_path / files.RESULTS_CSV).read_text() == (committed / files.RESULTS_CSV).read_text()
