"""PCCD's specification, one claim per test. Run: python -m pytest -q test_pccd.py

Tests marked `slow` train for real and are skipped unless --runslow is given.
"""
import os

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

import data
import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_CSV = os.path.join(HERE, "datasets", "mp20_train.csv")


@pytest.fixture(scope="module")
def mp20():
    return data.load_structures(TRAIN_CSV, verbose=False)


# ----------------------------------------------------------------------------------------------
# The representation (Fig. 7) and its decoder
# ----------------------------------------------------------------------------------------------

def test_encode_follows_the_papers_layout(mp20):
    s = mp20[0].structure
    cloud, elements = data.encode(s)
    assert cloud.shape == (3, 128, 3) and cloud.dtype == np.float32
    assert cloud.min() >= 0 and cloud.max() <= 1
    n = len(s)
    # channel 0: each atom's coordinates repeated 128 // n (or one more) times
    _, counts = np.unique(cloud[0], axis=0, return_counts=True)
    assert len(counts) == n and set(counts) <= {128 // n, 128 // n + 1}
    # channel 1: one-hot over the given elements, matching the composition
    assert np.all(cloud[1].sum(1) == 1)
    assert elements == data.default_elements(s)
    # channel 2: 64 identical angle rows, then 64 identical length rows
    assert np.allclose(cloud[2, :64], np.array(s.lattice.angles) / 180)
    assert np.all(cloud[2, 64:] == cloud[2, 64])


def test_round_trip_matches_every_bundled_structure(mp20):
    result = evaluate.roundtrip(mp20[:150])
    assert result["match_rate"] == 1.0, result["failures"]


def test_round_trip_keeps_a_lattice_vector_longer_than_15_angstrom(mp20):
    long = [c.structure for c in mp20 if max(c.structure.lattice.abc) > 15]
    assert long, "the bundled sample has cells longer than 15 A"
    s = max(long, key=lambda s: max(s.lattice.abc))                  # the 40.9 A one
    decoded = data.decode(*data.encode(s))
    assert np.allclose(decoded.lattice.abc, s.lattice.abc, rtol=1e-4)
    assert StructureMatcher().fit(decoded, s)


def test_round_trip_with_atoms_near_0_and_near_1(mp20):
    def near_edge(s):
        f = np.mod(s.frac_coords, 1)
        return np.any(f < 0.02) and np.any(f > 0.98)
    s = next(c.structure for c in mp20 if near_edge(c.structure))
    decoded = data.decode(*data.encode(s))
    assert len(decoded) == len(s)
    assert StructureMatcher().fit(decoded, s)


def test_an_atom_split_across_the_cell_boundary_decodes_to_one_atom():
    s = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    cloud, elements = data.encode(s)
    na_points = cloud[1, :, elements.index("Na")] == 1
    cloud[0, na_points] = np.where(np.arange(na_points.sum()) % 2 == 0, 0.01, 0.99)[:, None]
    decoded = data.decode(cloud, elements)
    assert len(decoded) == 2
    na = [site for site in decoded if site.specie.symbol == "Na"][0]
    assert np.allclose(data.periodic_difference(na.frac_coords, 0.0), 0, atol=1e-6)


def test_a_cluster_of_two_atoms_worth_of_points_becomes_two_atoms():
    # Two O atoms 0.04 apart: DBSCAN (eps 0.06) joins them; their point count splits them.
    s = Structure(Lattice.cubic(10.0), ["Mg", "O", "O", "Mg"],
                  [[0, 0, 0], [0.5, 0.5, 0.48], [0.5, 0.5, 0.52], [0.25, 0.25, 0.25]])
    decoded = data.decode(*data.encode(s))
    assert decoded.composition.reduced_formula == "MgO" and len(decoded) == 4
    oxygen_z = sorted(site.frac_coords[2] for site in decoded if site.specie.symbol == "O")
    assert np.allclose(oxygen_z, [0.48, 0.52], atol=1e-3)


def test_decode_explains_why_a_cloud_cannot_be_decoded():
    cloud = np.zeros((3, 128, 3), dtype=np.float32)
    cloud[2] = 0.5
    cloud[0] = np.random.default_rng(0).random((128, 3))             # scattered: no cluster
    with pytest.raises(ValueError, match="no atoms"):
        data.decode(cloud, ["Si"])
    cloud[2, :64] = [0.9, 0.9, 0.9]                                   # 162 degrees: no cell
    with pytest.raises(ValueError, match="degenerate"):
        data.decode(cloud, ["Si"])
    with pytest.raises(ValueError, match="NaN"):
        data.decode(np.full((3, 128, 3), np.nan), ["Si"])


def test_encode_refuses_17_sites_with_a_clear_message():
    s = Structure(Lattice.cubic(10.0), ["Si"] * 17, np.random.default_rng(0).random((17, 3)))
    with pytest.raises(ValueError, match="> 16 sites"):
        data.encode(s)


def test_encode_refuses_lengths_outside_the_models_range():
    s = Structure(Lattice.tetragonal(4.0, 80.0), ["Si"], [[0, 0, 0]])
    with pytest.raises(ValueError, match="outside the model's range"):
        data.encode(s)


@pytest.mark.parametrize("params", [
    (4.1, 5.3, 6.7, 71.0, 83.5, 102.0),      # triclinic
    (3.2, 3.2, 5.2, 90.0, 90.0, 120.0),      # hexagonal
    (5.64, 5.64, 5.64, 90.0, 90.0, 90.0),    # cubic
])
def test_lattice_from_parameters_agrees_with_pymatgen(params):
    ours = Lattice(data.lattice_from_parameters(*params))
    theirs = Lattice.from_parameters(*params)
    assert np.allclose(ours.abc, params[:3]) and np.allclose(ours.angles, params[3:])
    assert np.isclose(ours.volume, theirs.volume)


def test_dbscan_without_periodicity_on_a_hand_checkable_set():
    points = np.array([[0.0], [0.1], [0.2], [1.0], [1.1], [5.0]])
    labels = data.dbscan(points, eps=0.15, min_samples=2, periodic=False)
    assert labels[0] == labels[1] == labels[2] != labels[3] == labels[4]
    assert labels[5] == -1                                            # isolated: noise


def test_dbscan_with_periodicity_joins_points_across_the_boundary():
    points = np.array([[0.01, 0.5, 0.5], [0.99, 0.5, 0.5], [0.03, 0.5, 0.5], [0.5, 0.5, 0.5]])
    assert np.unique(data.dbscan(points, 0.05, 2, periodic=True)[:3]).size == 1
    flat = data.dbscan(points, 0.05, 2, periodic=False)
    assert flat[0] == flat[2] != flat[1] and flat[1] == -1
    assert data.dbscan(points, 0.05, 2)[3] == -1


def test_a_bad_row_and_a_four_element_structure_are_skipped_and_reported(tmp_path, capsys, mp20):
    import csv
    with open(TRAIN_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    good = [r for r in rows[:40]]
    four = next(r for r in rows if len(eval(r["elements"])) == 4)
    broken = dict(good[0], cif="data_broken\n_cell_length_a 3\nthis is not a CIF", material_id="bad")
    path = tmp_path / "mixed.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(good + [broken, four])
    usable_ids = {c.material_id for c in mp20}
    usable = [r for r in good if r["material_id"] in usable_ids]
    crystals = data.load_structures(str(path))
    line = capsys.readouterr().err
    assert "1 unreadable" in line and "with > 3 elements" in line
    assert [c.material_id for c in crystals] == [r["material_id"] for r in usable]
    assert crystals[0].band_gap == pytest.approx(float(usable[0]["band_gap"]))


def test_a_folder_of_cif_and_poscar_files_loads(tmp_path, mp20):
    mp20[0].structure.to(filename=str(tmp_path / "1.cif"))
    mp20[1].structure.to(filename=str(tmp_path / "POSCAR"), fmt="poscar")
    (tmp_path / "notes.txt").write_text("not a structure")
    crystals = data.load_structures(str(tmp_path), verbose=False)
    assert len(crystals) == 2
    assert StructureMatcher().fit(crystals[0].structure, mp20[0].structure)
