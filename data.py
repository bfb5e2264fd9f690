"""Crystals <-> point clouds: the PCCD representation (paper Fig. 7, Supplemental Fig. S1).

A crystal of at most 3 elements and 16 sites becomes a float32 array of shape (3, 128, 3),
an "image" with three channels of 128 points x 3 values, every value in [0, 1]:

    channel 0  fractional coordinates (x, y, z) of the atoms; atom i fills 128 // n
               consecutive points (the 128 % n spare points go one each to the first atoms)
    channel 1  the one-hot slot of each point's element among `elements` (1-3 symbols)
    channel 2  lattice: rows 0-63 hold the angles (alpha, beta, gamma), rows 64-127 the
               lengths (a, b, c), normalised as below

`decode` goes back: per element, a periodic DBSCAN groups the points into atoms, and the
lattice rows are averaged into a, b, c, alpha, beta, gamma and turned into vectors with
Eqs. S1-S3 (`lattice_from_parameters`).

Where this differs from the paper, and why
- Lengths. The paper divides lengths by a fixed 15 A, so 2.8% of MP-20's training crystals (cells
  up to 40.9 A) are clipped, and the common 3-10 A cells use only a sliver of the range. Here a length
  L is stored as (log L - log lo) / (log hi - log lo), where (lo, hi) is `length_range`, fitted
  to the training data (`fit_length_range`) and saved in the checkpoint. Nothing in the training
  data is clipped, and relative precision is the same for every length.
- Angles are stored as degrees / 180 (the paper: radians / 2 pi), which spreads the real range
  (about 7-169 degrees in the bundled MP-20 splits) over [0, 1] instead of [0, 0.5].
- Clustering. The paper's DBSCAN works in plain fractional coordinates, so points at 0.01 and
  0.99 (one atom on the cell face) become two atoms. Our DBSCAN measures minimum-image distances,
  averages a cluster with the circular mean, and splits a cluster that holds several atoms'
  worth of points (every atom owns about 128 / n of them).

numpy and pymatgen only: porting PCCD to another framework never touches this file.
"""
import collections
import contextlib
import csv
import errno
import gzip
import hashlib
import math
import os
import re
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure
from pymatgen.io.cif import CifFile, CifParser

N_POINTS = 128       # points per channel (the paper's W)
MAX_ELEMENTS = 3     # slots in channel 1
MAX_SITES = 16       # the paper's filter: at most 16 atoms in the cell
# Lengths (A) spanned by channel 2 when no model says otherwise: it covers every cell of the
# bundled MP-20 splits (2.26-40.9 A) and the Perov-5 and Carbon-24 samples (2.41-12.0 A). A
# trained model carries its own (`fit_length_range`: 1.95-51.1 A for the MP-20 train split).
DEFAULT_LENGTH_RANGE = (2.0, 50.0)

# Conditions of the model (paper: "band gap and magnetic ordering as the primary control
# variables"). 'unknown' is a real value: the MP-20 rows carry no magnetic ordering.
BAND_GAP_CLASSES = ("metal", "small", "large", "unknown")  # 0 eV, < 1.5 eV, >= 1.5 eV
MAGNETIC_ORDERINGS = ("NM", "FM", "FiM", "AFM", "unknown")


# ----------------------------------------------------------------------------------------------
# Encoding: crystal -> (3, 128, 3) cloud
# ----------------------------------------------------------------------------------------------

def encode(structure, elements=None, length_range=DEFAULT_LENGTH_RANGE):
    """Crystal -> (cloud, elements): `cloud` float32 (3, 128, 3) in [0, 1] (Fig. 7).

    `elements` fixes the slot order of channel 1 (default: by electronegativity). Raises
    ValueError for a structure PCCD cannot encode.
    """
    reason = unencodable_reason(structure)        # a model's crowded crystal is encoded too
    if reason:
        raise ValueError(f"{structure.composition.reduced_formula} ({len(structure)} sites) "
                         f"cannot be encoded: {reason.replace('with ', 'it has ')}")
    elements = check_elements(elements or default_elements(structure))
    species = [site.specie.symbol for site in structure]
    missing = sorted(set(species) - set(elements))
    if missing:
        raise ValueError(f"{structure.composition.reduced_formula} contains {' '.join(missing)}, "
                         f"not in the given elements {' '.join(elements)}")
    abc = np.array(structure.lattice.abc)
    lo, hi = length_range
    if abc.min() < lo or abc.max() > hi:
        raise ValueError(f"lattice lengths {abc.round(2).tolist()} A fall outside the length "
                         f"range {lo:.3g}-{hi:.3g} A")

    # Atoms grouped by element slot, so each element's points are contiguous (easier to read).
    order = sorted(range(len(structure)), key=lambda i: elements.index(species[i]))
    owner = np.array(order)[point_owner(len(structure))]              # (128,) site index
    cloud = np.zeros((3, N_POINTS, 3), dtype=np.float32)
    cloud[0] = np.mod(structure.frac_coords[owner], 1.0)              # positions
    cloud[1] = element_layout(elements, [species.count(e) for e in elements])   # element one-hot
    cloud[2, : N_POINTS // 2] = np.array(structure.lattice.angles) / 180.0
    cloud[2, N_POINTS // 2:] = _normalise_lengths(abc, length_range)
    return cloud, elements


# ----------------------------------------------------------------------------------------------
# Decoding: cloud -> crystal
# ----------------------------------------------------------------------------------------------

def decode(cloud, elements, length_range=DEFAULT_LENGTH_RANGE, eps=0.08, min_samples=3):
    """(3, 128, 3) cloud -> pymatgen Structure; the inverse of `encode`.

    Each point takes the element of its largest channel-1 value (among the given elements); the
    points of each element are clustered by a periodic DBSCAN, and a cluster becomes one atom at
    the circular mean of its points -- or m atoms when it holds m atoms' worth of points (an
    atom owns about 128 / n points; m is judged against the median cluster size, and a cluster
    of less than half that size is stray points, not an atom) that k-means can place at least
    MIN_SEPARATION (0.5 A) apart. Of two atoms closer than that, whatever their elements, only
    the one with more points stays (`_one_atom_per_spot`); structure.properties["atoms_merged"]
    says how many atoms these rules removed. Raises ValueError with a reason when no structure
    can be made.
    """
    elements = check_elements(elements)
    cloud = np.asarray(cloud, dtype=float)
    if cloud.shape != (3, N_POINTS, 3):
        raise ValueError(f"a PCCD cloud has shape (3, {N_POINTS}, 3), not {cloud.shape}")
    if not np.all(np.isfinite(cloud)):
        raise ValueError("the cloud contains NaN or infinite values")
    lattice = lattice_from_parameters(*decode_lattice(cloud, length_range))

    positions = np.mod(cloud[0], 1.0)
    slots = cloud[1, :, : len(elements)].argmax(1)
    clusters = []                                       # (element, points of one cluster)
    for slot, symbol in enumerate(elements):
        pts = positions[slots == slot]
        if len(pts) == 0:
            continue
        labels = dbscan(pts, eps, min_samples)
        clusters += [(symbol, pts[labels == k]) for k in range(labels.max() + 1)]
    if not clusters:
        raise ValueError("no atoms found: the points form no cluster (too noisy?)")

    unit = np.median([len(pts) for _, pts in clusters])  # points per atom
    atoms, wanted = [], 0                                # (points behind it, element, centre)
    for symbol, pts in clusters:
        m = int(round(len(pts) / unit))                  # 0: a few stray points, not an atom
        centres = _split_cluster(pts, m, lattice)
        atoms += [(len(pts) / len(centres), symbol, c) for c in centres]
        wanted += m
    species, coords = _one_atom_per_spot(atoms, lattice)
    if len(species) > MAX_SITES:
        raise ValueError(f"{len(species)} atoms found; PCCD makes at most {MAX_SITES}")
    # How many atoms the points asked for that the 0.5 A rules removed: the honest measure of
    # how often the model piles atoms on one spot (structural validity cannot show it any more).
    return Structure(Lattice(lattice), species, coords, properties=dict(atoms_merged=wanted - len(species)))


def element_layout(elements, counts):
    """Channel 1 of a crystal with counts[j] atoms of elements[j]: atoms in slot order, atom i
    owning its block of 128 // n points (`point_owner`), each point one-hot in its atom's slot.
    It is all the composition fixes of a cloud, and what structure prediction holds."""
    slot_of_atom = np.repeat(np.arange(len(elements)), counts)
    layout = np.zeros((N_POINTS, MAX_ELEMENTS), dtype=np.float32)
    layout[np.arange(N_POINTS), slot_of_atom[point_owner(int(sum(counts)))]] = 1.0
    return layout


def decode_blocks(cloud, elements, counts, length_range=DEFAULT_LENGTH_RANGE):
    """Decode a cloud whose composition is known (channel 1 = `element_layout(elements, counts)`):
    atom i sits at the circular mean of its own block of points -- no clustering, no count to
    guess; the structure has exactly the given composition (no atom merged: atoms_merged 0)."""
    owner, n = point_owner(int(sum(counts))), int(sum(counts))
    positions = np.mod(np.asarray(cloud[0], dtype=float), 1.0)
    coords = [circular_mean(positions[owner == i]) for i in range(n)]
    lattice = lattice_from_parameters(*decode_lattice(cloud, length_range))
    return Structure(Lattice(lattice), list(np.repeat(elements, counts)), coords, properties=dict(atoms_merged=0))


def parse_formula(text):
    """'Li2Co2O4' -> (elements in slot order, counts): what `generate --formula` asks for. Element
    symbols each followed by a whole number of atoms (none: 1); spaces are ignored. Raises
    ValueError, with the reason, for what PCCD cannot make (or a formula it cannot read: Li1.5,
    NaCl0 and Na1e1Cl are refused, not read as something else)."""
    compact = "".join(str(text).split())
    shown = compact if len(compact) <= 40 else compact[:37] + "..."
    if not re.fullmatch(r"(?:[A-Z][a-z]?[0-9]*)+", compact):
        raise ValueError(f"cannot read the formula {shown!r}: write element symbols, each followed by a "
                         f"whole number of atoms, like Li2Co2O4")
    counts = {}
    for symbol, number in re.findall(r"([A-Z][a-z]?)([0-9]*)", compact):
        if number and not number.strip("0"):
            raise ValueError(f"{shown}: atom counts must be whole numbers of at least 1 ({symbol}{number})")
        if len(number.lstrip("0")) > 3:                    # not read as a number (Python refuses 4300 digits)
            raise ValueError(f"{shown} has more than {MAX_SITES} atoms; PCCD makes 1 to {MAX_SITES}")
        counts[symbol] = counts.get(symbol, 0) + (int(number.lstrip("0")) if number else 1)
    try:
        elements = check_elements(canonical_order(check_elements(list(counts))))
    except ValueError as e:
        refused = re.match(r"'([A-Z])' is not a chemical element", str(e))      # FE2O3: 'E' alone is none
        pair = refused and re.search(rf"[A-Z]{refused[1]}(?![a-z])", compact)
        meant = pair and pair[0][0] + pair[0][1].lower()
        hint = f" in {shown}: a symbol is a capital and at most one small letter ({meant}, not {pair[0]})" \
            if meant and Element.is_valid_symbol(meant) else ""
        raise ValueError(f"{e}{hint}") from None
    if not 1 <= sum(counts.values()) <= MAX_SITES:
        raise ValueError(f"{shown} has {sum(counts.values())} atoms; PCCD makes 1 to {MAX_SITES}")
    return elements, [counts[e] for e in elements]


def formula(composition):
    """The reduced formula as the atoms are counted: MgO, LiO for Li2O2, O for a crystal of O atoms
    (pymatgen's reduced_formula names some compositions after molecules: LiO2, O2, H2O2)."""
    composition = Composition(composition)
    if any(n != round(n) for n in composition.values()):                 # partial occupancies
        return composition.reduced_formula
    counts = {e.symbol: int(round(n)) for e, n in composition.items()}
    divisor = math.gcd(*counts.values())
    return "".join(e + (str(counts[e] // divisor) if counts[e] != divisor else "") for e in canonical_order(counts))


def covalent_radius(symbol):
    """Covalent radius (A) of an element: Cordero et al. (2008), as pymatgen tabulates them; the
    elements after Cm (Z > 96), which the table lacks, get Cm's."""
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
    return CovalentRadius.radius.get(symbol, CovalentRadius.radius["Cm"])


def read_counts(cloud, elements, length_range=DEFAULT_LENGTH_RANGE):
    """How many atoms of each element a cloud holds, as the clustering decoder reads it (None when
    it reads no crystal): what physics-aware generation commits to (diffusion.Physics)."""
    try:
        composition = decode(cloud, elements, length_range).composition
    except ValueError:
        return None
    return [int(composition[e]) for e in elements]


def atom_layouts(element_lists, count_lists, volume_of):
    """The atoms behind a batch of clouds, for physics-aware sampling (diffusion.Physics), as
    arrays: owner (B, 128) the atom of each point (`point_owner`), radius (B, 16) each atom's
    covalent radius in A (0 past the last atom), volume (B, 16) the volume each atom takes in a
    crystal (`volume_of(symbol)`, A^3; 0 past the last atom), composition (B, 128, 3) channel 1
    (`element_layout`), committed (B,) bool, counts (the given counts, None where not committed).
    A None in count_lists: no layout (not committed)."""
    B = len(element_lists)
    layout = dict(owner=np.zeros((B, N_POINTS), dtype=np.int64), radius=np.zeros((B, MAX_SITES)),
                  volume=np.zeros((B, MAX_SITES)),
                  composition=np.zeros((B, N_POINTS, MAX_ELEMENTS), dtype=np.float32),
                  committed=np.zeros(B, dtype=bool), counts=[None] * B)
    for i, (elements, counts) in enumerate(zip(element_lists, count_lists)):
        if counts is None or not 1 <= sum(counts) <= MAX_SITES:
            continue
        layout["counts"][i] = [int(k) for k in counts]
        n = int(sum(counts))
        layout["owner"][i] = point_owner(n)
        layout["radius"][i, :n] = np.repeat([covalent_radius(e) for e in elements], counts)
        layout["volume"][i, :n] = np.repeat([volume_of(e) for e in elements], counts)
        layout["composition"][i] = element_layout(elements, counts)
        layout["committed"][i] = True
    return layout


def decode_all(clouds, element_lists, length_range=DEFAULT_LENGTH_RANGE, count_lists=None):
    """Decode every cloud (with `decode_blocks` where its atom counts are given, not None); returns
    (structures, with None where decoding failed; the reasons)."""
    structures, reasons = [], []
    for i, (cloud, elements) in enumerate(zip(clouds, element_lists)):
        try:
            counts = count_lists and count_lists[i]
            structures.append(decode(cloud, elements, length_range=length_range) if counts is None
                              else decode_blocks(cloud, elements, counts, length_range))
            reasons.append("")
        except ValueError as e:
            structures.append(None)
            reasons.append(str(e))
    return structures, reasons


SYMMETRY_TOLERANCE = 0.5   # A: generated crystals are symmetrised at this spglib symprec (EXPERIMENTS.md)


def symmetrise(structure, tolerance=SYMMETRY_TOLERANCE):
    """`structure` made exactly symmetric under the group spglib (through pymatgen) finds in it at
    `tolerance` A, and how far its farthest atom moved in the cell (A; the cell's own change is not
    counted). spglib only names the group's operations (R, t), fractional x -> R x + t; the crystal
    is then averaged over them: each atom goes to the mean of the images g(x_i) that land on it
    (periodic images unwrapped next to it), the metric tensor G to the mean of R^T G R. The average
    is symmetric under every g. Same cell, same atoms in the same order, same handedness; returned
    unchanged (moved 0) where the group is the identity alone or an operation does not map the
    atoms one to one."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
    try:                                  # fractional (R, t); spglib may fail to find a cell: raises
        operations = SpacegroupAnalyzer(structure, symprec=tolerance, angle_tolerance=5).get_symmetry_operations()
    except Exception:
        return structure, 0.0
    if len(operations) <= 1:
        return structure, 0.0
    kinds = [str(site.species) for site in structure]
    same_kind = np.array([[a == b for b in kinds] for a in kinds])
    x, G = structure.frac_coords, structure.lattice.metric_tensor
    positions, metric = np.zeros_like(x), np.zeros((3, 3))
    for R, t in ((op.rotation_matrix, op.translation_vector) for op in operations):
        d = (x @ R.T + t)[:, None, :] - x[None, :, :]           # g(x_i) - x_j, to the nearest image
        d -= np.round(d)
        squared = np.einsum("ijk,kl,ijl->ij", d, G, d)
        lands_on = np.where(same_kind, squared, np.inf).argmin(1)    # the atom g(x_i) lands on
        if len(set(lands_on.tolist())) != len(x):
            return structure, 0.0
        positions[lands_on] += x[lands_on] + d[np.arange(len(x)), lands_on]
        metric += R.T @ G @ R
    positions, metric = positions / len(operations), metric / len(operations)
    lengths = np.sqrt(np.diag(metric))
    cosines = [metric[1, 2] / (lengths[1] * lengths[2]), metric[0, 2] / (lengths[0] * lengths[2]),
               metric[0, 1] / (lengths[0] * lengths[1])]
    lattice = lattice_from_parameters(*lengths, *np.degrees(np.arccos(np.clip(cosines, -1, 1))))  # Eqs. S1-S3
    step = positions - x                                              # measured in the old cell
    moved = float(np.sqrt(np.einsum("ik,kl,il->i", step, G, step)).max())
    handedness = np.sign(np.linalg.det(structure.lattice.matrix))    # S1-S3 are right-handed; a mirror would not do
    return Structure(Lattice(handedness * lattice), structure.species, positions % 1.0,
                     properties=dict(structure.properties)), moved


def lattice_from_parameters(a, b, c, alpha, beta, gamma):
    """Lattice vectors (rows of a 3x3 matrix) from lengths and angles in degrees, Eqs. S1-S3:
        a_vec = a (1, 0, 0)                                                      (S1)
        b_vec = b (cos g, sin g, 0)                                              (S2)
        c_vec = c (cos b, (cos a - cos b cos g) / sin g,
                   sqrt(1 + 2 cos a cos b cos g - cos^2 a - cos^2 b - cos^2 g) / sin g)   (S3)
    Raises ValueError when the six numbers describe no cell (the square root's argument <= 0).
    """
    al, be, ga = np.radians([alpha, beta, gamma])
    volume_term = 1 + 2 * np.cos(al) * np.cos(be) * np.cos(ga) \
        - np.cos(al) ** 2 - np.cos(be) ** 2 - np.cos(ga) ** 2
    if not np.all(np.isfinite([a, b, c, alpha, beta, gamma])):
        raise ValueError("lattice parameters are not finite numbers")
    if min(a, b, c) <= 0 or volume_term <= 1e-8 or np.sin(ga) == 0:
        raise ValueError(f"no cell has lengths {a:.2f} {b:.2f} {c:.2f} A and angles "
                         f"{alpha:.1f} {beta:.1f} {gamma:.1f} degrees (degenerate lattice)")
    return np.array([
        [a, 0.0, 0.0],                                                               # (S1)
        [b * np.cos(ga), b * np.sin(ga), 0.0],                                       # (S2)
        [c * np.cos(be), c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga),    # (S3)
         c * np.sqrt(volume_term) / np.sin(ga)],
    ])


def decode_lattice(cloud, length_range=DEFAULT_LENGTH_RANGE):
    """(a, b, c, alpha, beta, gamma) from channel 2: the mean of the angle rows and of the
    length rows (the paper's "calculations average for every column")."""
    angles = np.asarray(cloud[2, : N_POINTS // 2], dtype=float).mean(0) * 180.0
    lengths = _denormalise_lengths(np.asarray(cloud[2, N_POINTS // 2:]).mean(0), length_range)
    return (*lengths, *angles)


# ----------------------------------------------------------------------------------------------
# What encode needs: which structures fit, element slots, the length scale, point ownership
# ----------------------------------------------------------------------------------------------

def unencodable_reason(structure, length_range=None, decodable=False):
    """Why PCCD cannot encode this structure (with a model's length range, if given), in a few
    words, or '' when it can; with `decodable`, also two atoms closer than MIN_SEPARATION, which
    the cloud holds but decoding reads as one (nothing to learn from, or to come back to)."""
    if not structure.is_ordered:
        return "disordered (partial occupancies)"
    if len(structure.composition.elements) > MAX_ELEMENTS:
        return f"with > {MAX_ELEMENTS} elements"
    if len(structure) > MAX_SITES:
        return f"with > {MAX_SITES} sites"
    if length_range and not length_range[0] <= min(structure.lattice.abc) <= max(structure.lattice.abc) <= length_range[1]:
        return f"with a lattice length outside {length_range[0]:.3g}-{length_range[1]:.3g} A"
    if decodable and len(structure) > 1:
        f = structure.frac_coords
        gaps = cartesian_gap(f[:, None], f[None], structure.lattice.matrix)[~np.eye(len(f), dtype=bool)]
        if gaps.min() < MIN_SEPARATION:
            return f"with two atoms under {MIN_SEPARATION} A apart (decoded as one)"
    return ""


def check_elements(elements):
    """Validate a list of element symbols; returns it as a list of str."""
    elements = [str(e) for e in elements]
    if not 1 <= len(elements) <= MAX_ELEMENTS:
        raise ValueError(f"{len(elements)} elements ({' '.join(elements) or 'none'}); "
                         f"PCCD encodes 1 to {MAX_ELEMENTS}")
    for symbol in elements:
        if not Element.is_valid_symbol(symbol):
            raise ValueError(f"{symbol!r} is not a chemical element symbol")
        if Element(symbol).symbol != symbol:                          # D and T: pymatgen's isotopes of H
            raise ValueError(f"'{symbol}' is an isotope of {Element(symbol).symbol}: write {Element(symbol).symbol}")
    if len(set(elements)) != len(elements):
        raise ValueError(f"repeated element in {' '.join(elements)}")
    return elements


def canonical_order(symbols):
    """Element symbols in the slot order the model is trained with: by electronegativity
    (Mg Mn O), so that `generate --elements O Mg Mn` asks for what training saw as Mg Mn O; equal
    ones alphabetically (Cu Si, both 1.90: as in every training crystal holding such a pair). The
    elements without one (He, Ne, Ar, Og, ...) come last, by atomic number: Ar F and F Ar are F Ar."""
    def key(symbol):
        with warnings.catch_warnings():               # pymatgen warns, and says NaN, for He, Ne, Ar
            warnings.simplefilter("ignore")
            x = Element(symbol).X
        return (x, 0, symbol) if np.isfinite(x) else (np.inf, Element(symbol).Z, "")
    return sorted((str(s) for s in symbols), key=key)


def default_elements(structure):
    """The slot order of channel 1 when none is given: by electronegativity, as in a formula
    (Mg, Mn, O)."""
    return canonical_order(el.symbol for el in structure.composition.elements)


def fit_length_range(structures, margin=1.25):
    """(lo, hi) in A covering every lattice length of `structures`, widened by `margin` on a log
    scale, so nothing in the training data is clipped and generation has some room."""
    lengths = np.array([s.lattice.abc for s in structures], dtype=float)
    return float(lengths.min() / margin), float(lengths.max() * margin)


def _normalise_lengths(abc, length_range):
    lo, hi = np.log(length_range[0]), np.log(length_range[1])
    return (np.log(abc) - lo) / (hi - lo)


def _denormalise_lengths(u, length_range):
    lo, hi = np.log(length_range[0]), np.log(length_range[1])
    return np.exp(lo + np.asarray(u, dtype=float) * (hi - lo))


def point_owner(n_atoms):
    """Which atom each of the 128 points belongs to: atom i owns 128 // n consecutive points,
    and the first 128 % n atoms one spare point each. Shape (128,)."""
    counts = np.full(n_atoms, N_POINTS // n_atoms)
    counts[: N_POINTS % n_atoms] += 1
    return np.repeat(np.arange(n_atoms), counts)


# ----------------------------------------------------------------------------------------------
# What decode needs: periodic distances, DBSCAN, circular means, one atom per spot
# ----------------------------------------------------------------------------------------------

def periodic_difference(a, b):
    """Minimum-image difference a - b of fractional coordinates, each component in [-0.5, 0.5)."""
    d = np.asarray(a) - np.asarray(b)
    return d - np.round(d)


def dbscan(points, eps, min_samples, periodic=True):
    """DBSCAN (Ester et al., 1996) on (N, D) points; returns labels (N,), -1 for noise.

    A point with at least `min_samples` points (itself included) within `eps` is a core point;
    clusters are the core points linked through such neighbourhoods, plus the border points
    they reach. With periodic=True, distances are minimum-image distances in the unit cell,
    so 0.01 and 0.99 are 0.02 apart.
    """
    points = np.asarray(points, dtype=float)
    diff = points[:, None, :] - points[None, :, :]                    # (N, N, D)
    if periodic:
        diff -= np.round(diff)
    neighbours = np.sqrt((diff ** 2).sum(-1)) <= eps                  # (N, N) bool
    is_core = neighbours.sum(1) >= min_samples
    labels = np.full(len(points), -1)
    cluster = 0
    for seed in np.flatnonzero(is_core):
        if labels[seed] != -1:
            continue
        labels[seed] = cluster
        frontier = [seed]
        while frontier:                                               # breadth-first growth
            p = frontier.pop()
            if not is_core[p]:
                continue                                              # border points stop here
            for q in np.flatnonzero(neighbours[p] & (labels == -1)):
                labels[q] = cluster
                frontier.append(q)
        cluster += 1
    return labels


def circular_mean(points):
    """Mean of fractional coordinates on the circle, so 0.01 and 0.99 average to 0.0."""
    angle = 2 * np.pi * np.asarray(points)
    mean = np.arctan2(np.sin(angle).mean(0), np.cos(angle).mean(0))
    return np.mod(mean / (2 * np.pi), 1.0)


MIN_SEPARATION = 0.5   # A: no two atoms of a real crystal are closer (CDVAE's validity cutoff)
_IMAGES = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])


def cartesian_gap(a, b, lattice):
    """Shortest distance (A) between fractional positions a and b (..., 3) over periodic images.
    The minimum image in fractional coordinates is not always the nearest one in a skewed cell,
    so the 27 images around it are all measured."""
    d = periodic_difference(a, b)[..., None, :] + _IMAGES                # (..., 27, 3)
    return np.linalg.norm(d @ lattice, axis=-1).min(-1)


def _split_cluster(points, m, lattice):
    """One cluster's points -> m atoms, or fewer: m atoms only if k-means puts their centres at
    least MIN_SEPARATION apart. Points piled on one spot are one atom, however many there are:
    the model put two atoms' points there, and two atoms cannot sit 0.3 A apart."""
    while m > 1:
        centres = _periodic_kmeans(points, m)
        gaps = cartesian_gap(centres[:, None], centres[None], lattice)
        if gaps[~np.eye(m, dtype=bool)].min() >= MIN_SEPARATION:
            return list(centres)
        m -= 1
    return [circular_mean(points)] * m


def _one_atom_per_spot(atoms, lattice):
    """[(points, element, centre)] -> (species, coords) with no two atoms closer than
    MIN_SEPARATION, whatever their elements: where the model put two atoms on one spot (say an
    O cluster and a Mn cluster 0.2 A apart), the spot keeps the atom with more points behind it
    -- as the paper does, which clusters the positions first and only then reads off each
    cluster's element."""
    species, coords = [], []
    for _, symbol, centre in sorted(atoms, key=lambda atom: -atom[0]):
        gaps = [cartesian_gap(centre, c, lattice) for c in coords]
        if min(gaps, default=np.inf) >= MIN_SEPARATION:
            species.append(symbol)
            coords.append(centre)
    return species, coords


def _periodic_kmeans(points, k, iterations=20):
    """Split one cluster's points into k atoms (k-means with minimum-image distances),
    started from mutually farthest points. Returns k centres."""
    middle = circular_mean(points)
    centres = [points[np.argmax(np.linalg.norm(periodic_difference(points, middle), axis=1))]]
    for _ in range(k - 1):
        dist = np.min([np.linalg.norm(periodic_difference(points, c), axis=1) for c in centres], 0)
        centres.append(points[np.argmax(dist)])
    centres = np.array(centres)
    for _ in range(iterations):
        dist = np.linalg.norm(periodic_difference(points[:, None], centres[None]), axis=2)
        nearest = dist.argmin(1)
        centres = np.array([circular_mean(points[nearest == j]) if np.any(nearest == j)
                            else centres[j] for j in range(k)])
    return centres


def encode_dataset(crystals, length_range):
    """Crystals -> what the diffusion model trains on: clouds (N, 3, 128, 3) float32 in [0, 1],
    element atomic numbers (N, 3), band-gap class (N,), magnetic ordering (N,), as numpy arrays."""
    clouds, conditions = [], []
    for c in crystals:
        cloud, symbols = encode(c.structure, length_range=length_range)
        clouds.append(cloud)
        conditions.append(encode_condition(symbols, c.band_gap_class, c.ordering))
    elements, band_gap, magnetic = zip(*conditions)
    return np.stack(clouds), np.array(elements), np.array(band_gap), np.array(magnetic)


# ----------------------------------------------------------------------------------------------
# The condition: elements, band gap, magnetic ordering
# ----------------------------------------------------------------------------------------------

@dataclass
class Crystal:
    """One usable structure with what PCCD conditions on."""
    structure: Structure
    material_id: str = ""
    band_gap: float = float("nan")      # eV; NaN when the source has none
    ordering: str = "unknown"           # magnetic ordering, one of MAGNETIC_ORDERINGS
    condition_unread: bool = False      # its source gave a band gap or ordering not understood

    @property
    def band_gap_class(self):
        return band_gap_class(self.band_gap)


def band_gap_class(band_gap):
    """The original code's three band-gap bins, plus 'unknown' for a missing value."""
    if band_gap is None or not np.isfinite(band_gap):
        return "unknown"
    if band_gap <= 1e-6:
        return "metal"
    return "small" if band_gap < 1.5 else "large"


def encode_condition(elements, band_gap="unknown", ordering="unknown"):
    """The model's condition as integers: atomic numbers of the element slots (0 = empty slot,
    taken from pymatgen, never a hand-typed table), the band-gap class index and the magnetic
    ordering index. Returns ([Z1, Z2, Z3], band_gap_index, ordering_index)."""
    if band_gap not in BAND_GAP_CLASSES:
        raise ValueError(f"band gap class {band_gap!r} is not one of {', '.join(BAND_GAP_CLASSES)}")
    if ordering not in MAGNETIC_ORDERINGS:
        raise ValueError(f"magnetic ordering {ordering!r} is not one of {', '.join(MAGNETIC_ORDERINGS)}")
    z = [Element(e).Z for e in check_elements(elements)]
    return z + [0] * (MAX_ELEMENTS - len(z)), BAND_GAP_CLASSES.index(band_gap), MAGNETIC_ORDERINGS.index(ordering)


# The element sets of the paper's three generation batches (Table 2, Fig. 3)
NOBLE_GASES = {"He", "Ne", "Ar", "Kr", "Xe", "Rn"}
RADIOACTIVE = {"Tc", "Pm"} | {Element.from_Z(z).symbol for z in range(84, 119)}
RARE_EARTHS = {"Sc", "Y"} | {Element.from_Z(z).symbol for z in range(57, 72)} - {"Pm"}
ALKALINE_EARTHS = {"Be", "Mg", "Ca", "Sr", "Ba"}
TRANSITION_METALS = {e.symbol for e in Element if e.is_transition_metal and e.Z < 80} - RADIOACTIVE
# Batch #3, "commonly used elements": the ten most abundant elements of the Earth's crust
# (O Si Al Fe Ca Na Mg K Ti H) plus the everyday anions and light elements (C N F P S Cl), the
# cheap battery and structural metals (Li Mn Ni Cu Zn). All are well represented in MP-20.
COMMON = {"O", "Si", "Al", "Fe", "Ca", "Na", "Mg", "K", "Ti", "H", "C", "N", "F", "P", "S",
          "Cl", "Li", "Mn", "Ni", "Cu", "Zn"}
POOLS = {
    "all": sorted({Element.from_Z(z).symbol for z in range(1, 84)} - NOBLE_GASES - RADIOACTIVE),
    "rare-earth-oxides": sorted(RARE_EARTHS | ALKALINE_EARTHS | TRANSITION_METALS),  # plus O
    "common": sorted(COMMON),
}


def draw_element_sets(pool, n, rng):
    """n random element sets from one of the paper's three batches: 1-3 elements from the pool,
    or, for batch #2, O plus 1-2 metals."""
    symbols = POOLS[pool]
    sets = []
    for _ in range(n):
        if pool == "rare-earth-oxides":
            sets.append(list(rng.choice(symbols, size=rng.integers(1, 3), replace=False)) + ["O"])
        else:
            sets.append(list(rng.choice(symbols, size=rng.integers(1, 4), replace=False)))
    return [[str(e) for e in s] for s in sets]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar")


COMPRESSED = (".gz", ".bz2", ".xz", ".zip")


# Files the project (and most tools) write that are never a POSCAR, whatever their name holds
NOT_STRUCTURE_SUFFIXES = (".csv", ".json", ".npz", ".png", ".pdf", ".svg", ".jpg", ".jpeg", ".gif", ".eps", ".tif",
                          ".tiff", ".txt", ".log", ".md", ".pt", ".tmp", ".py", ".sh", ".pl", ".rb", ".c", ".f90",
                          ".ipynb", ".xyz", ".xml", ".out", ".dat", ".h5", ".yaml", ".html", ".tar", ".vesta")


def _is_structure_file(name):
    """A CIF or POSCAR by its name, compressed or not (a compressed one is skipped, and said):
    *.cif, *.vasp, *.poscar, a name that starts with POSCAR or CONTCAR in any case (poscar_2,
    CONTCAR.relaxed), or holds them in capitals, as pymatgen reads them (MgO_POSCAR), unless it ends
    like another kind of file (POSCAR_screening.csv, MgO_POSCAR.jpeg)."""
    base = os.path.basename(name)
    stem = base[: -len(base.rsplit(".", 1)[1]) - 1] if base.lower().endswith(COMPRESSED) else base
    named = stem.upper().startswith(("POSCAR", "CONTCAR")) or "POSCAR" in stem or "CONTCAR" in stem
    return stem.lower().endswith(STRUCTURE_SUFFIXES) or (named and not stem.lower().endswith(NOT_STRUCTURE_SUFFIXES))


class Misread(ValueError):
    """A file pymatgen reads, but as another crystal than the one written in it."""


# What pymatgen only warns about, but makes a different crystal of: (its warning, our reason)
MISREAD = [("Missing elements", "with atoms pymatgen dropped (an element it does not know or not given?)"),
           ("Elements in POSCAR cannot be determined", "without element names (a POSCAR with no species line)"),
           ("sum to > 1", "with occupancies above 1 (two atoms on one spot?)"),     # a refusal, said why
           ("implicit hydrogens", "with hydrogens not written as atoms (_atom_site_attached_hydrogens)")]
LABEL_GUESS = "with a site whose element pymatgen guesses from its label (NO3 as N?)"
# ... and of an ordered crystal only (a disordered one's formula counts whole atoms; said below):
STOICHIOMETRY = ("Incorrect stoichiometry", "whose atoms disagree with its formula (a truncated copy?)")
FRACTIONAL = ("_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z")
SYMMETRY_OPERATORS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz")
# Where a CIF names its space group; pymatgen reads a name it does not know as P1, without the symmetry
SPACE_GROUP_TAGS = ("_symmetry_space_group_name_h-m", "_symmetry_space_group_name_h_m", "_space_group_name_h-m_alt",
                    "_space_group_name_hall", "_symmetry_space_group_name_hall", "_space_group_it_number",
                    "_symmetry_int_tables_number")


# Space groups whose name (or number) alone does not fix the setting (International Tables): two
# origins, and the rhombohedral groups on hexagonal or rhombohedral axes. pymatgen takes origin 1
# and hexagonal axes, so diamond's Si at 1/8, 1/8, 1/8 (origin 2) would become 16 atoms.
TWO_ORIGINS = (48, 50, 59, 68, 70, 85, 86, 88, 125, 126, 129, 130, 133, 134, 137, 138, 141, 142, 201, 203, 222,
               224, 227, 228)
RHOMBOHEDRAL = (146, 148, 155, 160, 161, 166, 167)


def _group_numbers(data):
    """The space groups a CIF names, one for each Hermann-Mauguin symbol or number it writes."""
    from pymatgen.symmetry.groups import SpaceGroup
    numbers = []
    for tag in SPACE_GROUP_TAGS:
        value = data.get(tag)
        if isinstance(value, str) and "hall" not in tag and ":" not in value:      # F d -3 m :2 names its origin
            try:
                numbers.append(int(value) if tag.endswith("number") else SpaceGroup(value.strip(" '\"")).int_number)
            except ValueError:
                continue
    return numbers


def _number(value):
    """A CIF number ('4.2', '4.20(3)' with its uncertainty) as a float; None for '?', '.' or text."""
    try:
        return float(re.sub(r"\(\d+\)$", "", value.strip().strip("'\"")))
    except (AttributeError, ValueError):
        return None


def _cif_misread(block):
    """Why pymatgen would read this CIF data block as another crystal than the one written ('' if it
    would not), and the block's data names and values, named in lower case."""
    # pymatgen keeps the last of a data name written twice, flips a negative length, folds an angle
    # outside 0-180 degrees back into it and reads '.' (not applicable) as 0
    fields = re.sub(r"(?ms)^;.*?^;", "", block)               # text fields hold no data names
    names = [name.lower() for name in re.findall(r"(?m)^[ \t]*(_\S+)", fields)
             if name.lower().startswith(("_cell_", "_atom_site_", "_symmetry_", "_space_group_"))]
    if len(set(names)) < len(names):                          # of those that make the crystal
        return "with a data name written twice (which value is meant?)", {}
    items = next(iter(CifFile.from_str(block).data.values()), None)
    data = {key.lower(): value for key, value in (items.data.items() if items else [])}
    for axis in "abc":
        if (_number(data.get(f"_cell_length_{axis}")) or 0) < 0:
            return "with a negative cell length", data
    for angle in ("alpha", "beta", "gamma"):
        value = _number(data.get(f"_cell_angle_{angle}"))
        if value is not None and not 0 < value < 180:
            return "with a cell angle not between 0 and 180 degrees (exclusive)", data
    cell = [_number(data.get(f"_cell_length_{axis}")) for axis in "abc"] + \
        [_number(data.get(f"_cell_angle_{angle}")) for angle in ("alpha", "beta", "gamma")]
    if None not in cell:                                  # pymatgen fails on a cell of no volume, unsaid
        try:
            degenerate = degenerate_lattice(Lattice(lattice_from_parameters(*cell)))
        except ValueError:                                # lengths of 0, angles no cell has
            degenerate = True
        if degenerate:
            return "with a degenerate cell", data
    if "_atom_site_cartn_x" in data and "_atom_site_fract_x" not in data:
        return "with Cartesian coordinates only (_atom_site_Cartn_x; pymatgen reads fractional ones)", data
    for key in SYMMETRY_OPERATORS:
        values = data.get(key, [])
        if any(value.count(",") != 2 for value in ([values] if isinstance(values, str) else values)):
            return "with a symmetry operator that is not x,y,z (written with spaces but no quotes?)", data
    for column in (data.get(key, []) for key in FRACTIONAL):
        if any(value.strip() == "." for value in ([column] if isinstance(column, str) else column)):
            return "with a coordinate written as '.' (not a number)", data
    occupancies = data.get("_atom_site_occupancy", [])
    occupancies = [_number(value) for value in ([occupancies] if isinstance(occupancies, str) else occupancies)]
    if any(value is not None and value <= 0 for value in occupancies):
        return "with an occupancy of 0 or below (a site that holds no atom?)", data    # pymatgen drops it, unsaid
    symbols = data.get("_atom_site_type_symbol", [])
    for symbol in [symbols] if isinstance(symbols, str) else symbols:      # pymatgen reads Va as V, Uuo as U
        letters = re.match(r"[A-Za-z]*", symbol.strip(" '\"")).group()     # Fe of Fe3+, Fe1a; fe; O of Ow (water)
        if letters and letters[0] not in "Xx" and not any(Element.is_valid_symbol(x.capitalize()) for x in
                                                           (letters, letters[:-1] if letters.endswith("w") else "")):
            return "with a type symbol that is not an element (Va, a vacancy?)", data     # X: a dummy, said below
    if not any(key in data for key in SYMMETRY_OPERATORS):              # the group named, not written out
        groups = _group_numbers(data)
        if len(set(groups)) > 1:                   # pymatgen reads the name, unsaid
            return "whose space group name and number disagree (which is meant?)", data
        group = groups[0] if groups else None
        if group in TWO_ORIGINS or group in RHOMBOHEDRAL and \
                not np.allclose([a or 0 for a in cell[3:]], [90, 90, 120], atol=0.01):      # not hexagonal axes
            return "with a space group named whose origin or axes its name leaves open (write out its " \
                   "_symmetry_equiv_pos_as_xyz)", data
    return "", data


def _label_names(label, element):
    """Whether a site label pymatgen read as `element` names it: its letters are the element in
    any case (NA, CO1 for Co) or the element and lower-case letters (Ow1, Hw: water's O and H), not
    another element's symbol after it (NO3 read as N, OH as O)."""
    letters = re.sub(r"[^A-Za-z]", "", label)
    return letters.lower() == element.lower() or (
        letters[:len(element)].lower() == element.lower() and letters[len(element):].islower())


def _poscar_misread(text):
    """Why pymatgen would read this POSCAR as another crystal, or not at all, or '': it takes as
    many names from the species line as there are counts, and drops the rest."""
    lines = [re.split(r"[#!]", line)[0] for line in text.splitlines()]      # comments after # or !
    if len(lines) > 1 and len(lines[1].split()) == 3 and all(_number(x) is not None for x in lines[1].split()):
        return "with three scale factors (VASP 6; pymatgen reads one)"
    names, counts = (lines[5].split(), lines[6].split()) if len(lines) > 6 else ([], [])
    if names and counts and not any(_number(n) is not None for n in names) and \
            all(c.isdigit() for c in counts) and len(names) != len(counts):
        return "whose species line and counts disagree (elements without atoms?)"
    if any(n.isalpha() and not Element.is_valid_symbol(n) and Element.is_valid_symbol(n.capitalize()) for n in names):
        return "with an element name not written as its symbol (na or NA for Na)"
    return ""


def _volume_as_scale(text):
    """A POSCAR whose scale is negative gives its cell's volume instead: pymatgen scales the cell to
    it, but multiplies Cartesian coordinates by the negative number itself (a crowded crystal, unsaid).
    The scale it means, (volume / |det L|)^(1/3), is written in its place, for both to be read alike."""
    lines = text.split("\n")
    try:
        scale = float(re.split(r"[#!]", lines[1])[0])
        cell = np.array([[float(x) for x in line.split()] for line in lines[2:5]])
        volume = abs(np.linalg.det(cell))
    except (IndexError, ValueError, np.linalg.LinAlgError):       # pymatgen's to refuse
        return text
    if not (scale < 0 and volume > 0):
        return text
    lines[1] = repr(float((-scale / volume) ** (1 / 3)))
    return "\n".join(lines)


def _blocks(text, fmt):
    """A CIF's data blocks that hold a crystal (atom sites; a journal's data_global block of titles
    and authors does not), each read alone; a POSCAR is one block. Line ends made Unix's."""
    if text is None:
        return [text]
    text = text.replace("\r\n", "\n").replace("\r", "\n")    # Windows' and old Macs' line ends
    if fmt != "cif":
        return [text]
    fields = re.sub(r"(?ms)^;.*?^;", lambda m: re.sub(r"[^\n]", " ", m.group()), text)   # a ;text field; blanked
    heads = list(re.finditer(r"(?im)^[ \t]*(data_)", fields))        # DATA_x too: data names are case-insensitive
    blocks = ["data_" + text[head.end(1):end] for head, end in zip(heads, [h.start() for h in heads[1:]] + [len(text)])]
    return [b for b in blocks if re.search(r"(?m)^\s*_atom_site_", b)] or blocks or [text]


def _check_sites(structures, items):
    """Raises Misread where a site of the CIF's atom loop has no element written ('?', '.' or no
    type symbol column) and pymatgen either left it out or took its element from a label whose
    letters do not name it (NH4 as nihonium)."""
    def column(key):
        value = items.get(key)
        return [value] if isinstance(value, str) else list(value or [])
    labels, symbols = column("_atom_site_label"), column("_atom_site_type_symbol")
    places = list(zip(*(column(key) for key in FRACTIONAL)))
    elements = {}
    for s in structures:
        for site in s:
            elements.setdefault(site.label, set()).update(e.symbol for e in site.species.elements
                                                          if hasattr(e, "symbol"))
    for i, label in enumerate(labels):
        symbol = symbols[i].strip(" '\"") if i < len(symbols) else ""
        if symbol not in ("?", ".", ""):                 # its element is written: pymatgen's to read
            continue
        if label not in elements:                        # unless it shares its spot with another row
            if not (i < len(places) and places.count(places[i]) > 1):
                raise Misread(MISREAD[0][1])
            continue
        letters = re.match(r"[A-Za-z]*", label).group()  # O1W, H1A: the letters before the number
        if not all(_label_names(letters, e) and Element(e).Z <= 103 for e in elements[label]):
            raise Misread(LABEL_GUESS)


def _parse_structures(block, fmt):
    """The structures of one CIF data block (usually one) or of a POSCAR, without oxidation states
    (Li+ is Li). Raises Misread(reason) for a block pymatgen reads as another crystal (MISREAD)."""
    failure = None
    with warnings.catch_warnings(record=True) as caught:     # it warns about rounding in most CIFs
        warnings.simplefilter("always")
        block = block if fmt == "cif" else _volume_as_scale(block)
        reason, items = _cif_misread(block) if fmt == "cif" else (_poscar_misread(block), {})
        if reason:
            raise Misread(reason)
        try:
            structures = CifParser.from_str(block).parse_structures(primitive=False) if fmt == "cif" \
                else [Structure.from_str(block, fmt=fmt)]
        except Exception as e:                  # unreadable, unless a warning says why
            structures, failure = [], e
    ordered = all(s.is_ordered for s in structures)
    for warning in caught:
        for says, reason in MISREAD + [STOICHIOMETRY] * ordered:
            if says in str(warning.message):
                raise Misread(reason)
        guessed = re.fullmatch(r"(\S+) parsed as (\S*)", str(warning.message))   # from a site's label
        if guessed and not (guessed[2] and _label_names(guessed[1], guessed[2])):
            raise Misread(LABEL_GUESS)
        if "Defaulting to P1" in str(warning.message):    # P1 only for a CIF that names no group
            if any(isinstance(items.get(tag), str) and items[tag].strip(" '\"") not in ("?", ".", "1", "P1", "P 1")
                   for tag in SPACE_GROUP_TAGS):
                raise Misread("whose space group pymatgen cannot read (it would read the crystal as P1)")
    if failure is not None:
        raise failure
    if fmt == "cif" and ordered:
        _check_sites(structures, items)
    for s in structures:
        elements = [getattr(e, "element", e) for e in s.composition.elements]      # an ion's element
        if any(getattr(e, "name", "") in ("D", "T") for e in elements):   # pymatgen's isotopes of H, whose
            raise Misread("with an isotope (D or T: write H)")              # mass is lost below (read as H)
        try:
            s.remove_oxidation_states()
        except ValueError:                          # pymatgen: "'X' is not a valid Element" (checked again below)
            raise Misread("with a dummy species (not an element)") from None
    return structures


def is_csv(path):
    """A CDVAE CSV, plain or gzip-compressed (the bundled MP-20 splits are .csv.gz)."""
    return path.lower().endswith((".csv", ".csv.gz"))


# skipped, but no crystal is lost: not counted as a failed crystal where files are screened
NOT_A_CRYSTAL = ("not a regular file", "a POSCAR beside its CIF", "hidden (a name starting with '.')",
                 "named unlike a CIF or POSCAR (.cif, .vasp, .poscar, POSCAR, CONTCAR)")


def _shown(name):
    """A file name as text every output can hold: bytes that are not UTF-8 (a name from a Windows
    zip, say) become U+FFFD instead of Python's surrogates, which no UTF-8 file or JSON accepts."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _same_crystal(poscar, cif):
    """Whether two files hold the same crystal (as generate writes them): the same cell to 0.1% and
    each atom of one on an atom of the same element in the other (to 1e-4 of the cell). A file that
    cannot be read is not the same: it is read, and its reason said."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, b = Structure.from_file(poscar), Structure.from_file(cif)
    except Exception:
        return False
    if len(a) != len(b) or not np.allclose(a.lattice.parameters, b.lattice.parameters, rtol=1e-3):
        return False
    on = (np.abs(periodic_difference(a.frac_coords[:, None], b.frac_coords[None])) < 1e-4).all(-1)
    on &= np.array([[x.species == y.species for y in b] for x in a])
    return bool(on.any(0).all() and on.any(1).all())


def _read_rows(path):
    """Yield (name, fmt, text, properties, why it is skipped or '') for each structure in a CSV, a
    folder (its structure files, and a reason for each other file not plainly of another kind; not
    its subfolders) or a file."""
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        cif_of = {os.path.splitext(n)[0]: n for n in names if n.lower().endswith(".cif")}
        for name in names:
            full, (stem, suffix) = os.path.join(path, name), os.path.splitext(name)
            if not _is_structure_file(name):  # said, unless plainly another kind: an output, a CSV, a folder
                if not (name.startswith(".") or name.lower().endswith(NOT_STRUCTURE_SUFFIXES) or is_csv(name)
                        or os.path.isdir(full)):
                    yield _shown(name), None, None, {}, NOT_A_CRYSTAL[3]       # e.mcif, x.vasp.bak, notes
            elif os.path.isdir(full):         # a subfolder, or a link to one: never entered
                yield _shown(name), None, None, {}, NOT_A_CRYSTAL[0]
            elif name.startswith("."):        # macOS's ._x.cif beside x.cif, an editor's backup
                yield _shown(name), None, None, {}, NOT_A_CRYSTAL[2]
            elif suffix.lower() != ".cif" and stem in cif_of and _same_crystal(full, os.path.join(path, cif_of[stem])):
                yield _shown(name), None, None, {}, NOT_A_CRYSTAL[1]        # generate writes both
            else:
                yield from _read_rows(full)
    elif not os.path.isfile(path):            # a named pipe, a device: reading it could wait forever
        yield _shown(os.path.basename(path)), None, None, {}, NOT_A_CRYSTAL[0]
    elif is_csv(path):
        csv.field_size_limit(2**31 - 1)
        opener = gzip.open if path.lower().endswith(".gz") else open
        damaged = (EOFError, zlib.error, gzip.BadGzipFile)
        try:
            with opener(path, "rt", newline="", encoding="utf-8-sig") as f:    # -sig: a BOM is not a name
                reader = csv.DictReader(f, strict=True)     # strict: a stray quote is an error, not 150 rows
                if reader.fieldnames is None:
                    raise ValueError(f"{path} is empty (expected the CDVAE CSV format: a header with 'cif')")
                if reader.fieldnames.count("cif") != 1:
                    raise ValueError(f"{path} has " + ("two 'cif' columns (which is meant?)" if "cif" in reader.fieldnames
                                                       else "no 'cif' column (expected the CDVAE CSV format)"))
                for i, row in enumerate(reader):
                    yield row.get("material_id") or f"row {i}", "cif", row["cif"], row, \
                        "a CSV row without its cif field (cut short?)" if row["cif"] is None else \
                        "a CSV row with more fields than its header (a comma outside quotes?)" if any(
                            field.strip() for field in row.get(None, [])) else ""         # a trailing comma: none
        except csv.Error as e:
            raise ValueError(f"{path} is not a well-formed CSV (line {reader.reader.line_num}: {e}): "
                             f"a stray quote, or cut short?") from None
        except damaged as e:
            raise ValueError(f"{path} is not a readable gzip file ({e}): a truncated or damaged copy?") from None
        except UnicodeDecodeError:
            try:
                with opener(path, "rb") as f:     # the decoder counted from its last chunk: find the byte
                    raw = f.read()
            except damaged:                       # cut short after the bad byte
                raw = b""
            if raw.startswith(b"\x1f\x8b"):
                raise ValueError(f"{path} is gzip-compressed: name it .csv.gz") from None
            try:
                raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#x} at {e.start}): "
                                 f"save it as UTF-8") from None
            raise ValueError(f"{path} is not UTF-8 text: save it as UTF-8") from None
    elif path.lower().endswith(COMPRESSED):
        yield _shown(os.path.basename(path)), None, None, {}, "compressed (unpack it first)"
    else:
        fmt = "cif" if path.lower().endswith(".cif") else "poscar"
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:                  # unopenable: said, like any bad file
            yield _shown(os.path.basename(path)), fmt, None, {}, f"unreadable ({(e.strerror or str(e)).lower()})"
            return
        try:
            text = raw.decode("utf-8-sig")    # -sig: Notepad's byte-order mark is not text
        except UnicodeDecodeError:            # an old CIF's author named in Latin-1
            text = raw.decode("latin-1")
        why = "gzip-compressed (unpack it first)" if raw.startswith(b"\x1f\x8b") else \
            "not UTF-8 text (UTF-16?): save it as UTF-8" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else \
            "binary (not text)" if "\0" in text else ""
        yield _shown(os.path.basename(path)), fmt, None if why else text, {}, why


def degenerate_lattice(lattice):
    """True for a cell with (near) zero volume or (near) coplanar vectors: V < 0.1 A^3 (CDVAE's
    cutoff) or V / (a b c) < 0.01 (real cells: above 0.15)."""
    volume = abs(lattice.volume)
    return not volume >= 0.1 or not volume / np.prod(lattice.abc) >= 0.01


def _condition(props):
    """A row's band gap (eV; NaN if none) and magnetic ordering ('unknown' if none), and True if
    it gave one that is not understood ('1,5', a negative gap, 'ferro'): taken as unknown, and said."""
    gap_text, ordering_text = ((props.get(key) or "").strip() for key in ("band_gap", "ordering"))
    gap_text = "" if gap_text.lower() in ("nan", "none", "null", "n/a", "na", "?", "unknown") else gap_text  # none given
    band_gap = _to_float(gap_text)
    band_gap = band_gap if np.isfinite(band_gap) and band_gap >= 0 else float("nan")
    ordering = {o.lower(): o for o in MAGNETIC_ORDERINGS}.get(ordering_text.lower(), "unknown")
    return band_gap, ordering, (bool(gap_text) and np.isnan(band_gap)) or \
        (bool(ordering_text) and ordering_text.lower() not in map(str.lower, MAGNETIC_ORDERINGS))


def _parse_rows(path, tick=None):
    """Yield (name, structure or None, why it is unusable or '', band_gap, ordering, whether a
    condition was not understood) for each structure in a CSV, a folder or a file: the slow part
    of loading (a CIF takes ~3 ms). tick(n), if given, is called with the rows parsed so far."""
    for n, (name, fmt, text, props, skip) in enumerate(_read_rows(path)):
        if tick:
            tick(n)
        band_gap, ordering, unread = _condition(props)
        skip = skip or ("empty" if text is not None and not text.strip() else "")
        blocks = [text] if skip else _blocks(text, fmt)
        for b, block in enumerate(blocks):              # a CIF of several data blocks: name#2, ..., each alone
            label = name + (f"#{b + 1}" if len(blocks) > 1 else "")
            try:
                structures = [] if skip else _parse_structures(block, fmt)
                reason = skip or ("" if structures else "unreadable")
            except Misread as e:
                structures, reason = [], str(e)
            except Exception:
                structures, reason = [], "unreadable"
            if reason:
                yield label, None, reason, band_gap, ordering, unread
            for k, structure in enumerate(structures):
                reason = "with coordinates or a cell that are not finite numbers" if not (
                    np.isfinite(structure.frac_coords).all() and np.isfinite(structure.lattice.matrix).all()) else \
                    "with a degenerate cell" if degenerate_lattice(structure.lattice) else \
                    "disordered (partial occupancies)" if not structure.is_ordered else \
                    "with a dummy species (not an element)" if not all(
                        isinstance(e, Element) for e in structure.composition.elements) else ""
                yield (label + (f"#{k + 1}" if len(structures) > 1 else ""), None if reason else structure, reason,
                       band_gap, ordering, unread)


# The parsed rows of a CSV are cached beside it, in .pccd_cache/, as arrays (a lattice, atomic
# numbers and fractional coordinates per row): 11,359 MP-20 crystals parse in ~15 s and come back
# from the cache in ~1 s. The key is the file's content (SHA-256), so an edited file is parsed
# again; the length range is applied after loading, so one cache serves every model.
CACHE_FOLDER, CACHE_VERSION = ".pccd_cache", 10     # a new version when the reasons for skipping change


def cache_path(path):
    """Where the parsed rows of the CSV `path` are cached: named after its content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), CACHE_FOLDER)
    return os.path.join(folder, f"{os.path.basename(path)}.{digest.hexdigest()[:16]}.v{CACHE_VERSION}.npz")


def _cached_rows(path, tick=None):
    """The rows of `_parse_rows` for a CSV, from its cache when there is one; otherwise parsed
    (tick as there) and cached (a folder that cannot be written to just goes without a cache)."""
    cache = cache_path(path)
    c = None
    if os.path.exists(cache):
        try:
            with np.load(cache) as f:
                c = {k: f[k] for k in f.files}        # read each array once, not once per row
            if not {"name", "reason", "band_gap", "ordering", "unread", "n_sites", "lattice", "numbers",
                    "frac_coords"} <= set(c):
                raise KeyError("an array is missing")
        except Exception:                             # a damaged cache: parsed again, and rewritten
            c = None
            try:
                os.remove(cache)
            except OSError:
                pass
    if c is not None:
        starts = np.cumsum(c["n_sites"]) - c["n_sites"]
        for i, (name, reason, band_gap, ordering, unread) in enumerate(zip(
                c["name"].tolist(), c["reason"].tolist(), c["band_gap"].tolist(), c["ordering"].tolist(),
                c["unread"].tolist())):
            sites = slice(starts[i], starts[i] + c["n_sites"][i])
            structure = None if reason else \
                Structure(Lattice(c["lattice"][i]), c["numbers"][sites].tolist(), c["frac_coords"][sites])
            yield name, structure, reason, band_gap, ordering, unread
        return
    rows = list(_parse_rows(path, tick))
    structures = [r[1] for r in rows if r[1] is not None]
    arrays = dict(
        name=np.array([r[0] for r in rows]), reason=np.array([r[2] for r in rows]),
        band_gap=np.array([r[3] for r in rows], dtype=float), ordering=np.array([r[4] for r in rows]),
        unread=np.array([r[5] for r in rows], dtype=bool),
        n_sites=np.array([len(r[1]) if r[1] else 0 for r in rows], dtype=np.int64),
        lattice=np.array([r[1].lattice.matrix if r[1] else np.zeros((3, 3)) for r in rows]).reshape(-1, 3, 3),
        numbers=np.array([site.specie.Z for s in structures for site in s], dtype=np.int64),
        frac_coords=np.array([site.frac_coords for s in structures for site in s]).reshape(-1, 3))
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        stale = re.compile(re.escape(os.path.basename(path)) + r"\.[0-9a-f]{16}\.v\d+\.npz")
        for old in os.listdir(os.path.dirname(cache)):              # earlier contents of this file
            if stale.fullmatch(old) and old != os.path.basename(cache):
                os.remove(os.path.join(os.path.dirname(cache), old))
        with written(cache, new=False) as tmp, open(tmp, "wb") as f:  # two loads at once: the same file
            np.savez(f, **arrays)
    except OSError:                           # a read-only folder, a full disk: load without a cache
        pass
    yield from rows


def load_structures(path, verbose=True, only_encodable=True, skipped=None, length_range=None, named=None,
                    progress=None, decodable=False):
    """Read the structures PCCD can encode from a CDVAE-style CSV (a `cif` column, optional
    `material_id`, `band_gap`, `ordering`; plain or .csv.gz; its parsed rows are cached, see
    CACHE_FOLDER), a folder of CIF/POSCAR files, or one such file.

    Keeps crystals of <= 3 elements and <= 16 sites (the paper's filter; only_encodable=False
    keeps every readable one; a model's length_range also drops longer and shorter cells). A bad
    row or file (unparsable, binary, empty, a degenerate cell, partial occupancies) is counted
    and skipped, never fatal. Prints one line saying what was kept and skipped (or, with
    verbose=False, fills the dict `skipped` with {reason: count}; a list `named` gets (name, reason)
    for each). decodable: no two atoms closer than MIN_SEPARATION either (what train learns from).
    Parsing that takes long says how far it has come every 10 s (progress: default verbose).
    Returns a list of `Crystal`.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    kept, skipped = [], {} if skipped is None else skipped
    cached = is_csv(path) and os.path.isfile(path)                                   # a pipe is not hashed
    said, progress = [time.monotonic()], verbose if progress is None else progress

    def tick(n):                                  # a progress line every 10 s of parsing
        if progress and time.monotonic() - said[0] >= 10:
            unit = "row" if cached else "file" if os.path.isdir(path) else "structure"
            later = " (then cached for the next time)" if cached and os.access(os.path.dirname(
                os.path.abspath(path)), os.W_OK) else ""
            print(f"{path}: {n} {unit}{'s' * (n != 1)} parsed so far{later} ...", file=sys.stderr, flush=True)
            said[0] = time.monotonic()
    for name, structure, reason, band_gap, ordering, unread in (_cached_rows if cached else _parse_rows)(path, tick):
        if not reason and only_encodable:
            reason = unencodable_reason(structure, length_range, decodable)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            if named is not None:
                named.append((name, reason))
            continue
        kept.append(Crystal(structure=structure, material_id=name, band_gap=band_gap, ordering=ordering,
                            condition_unread=unread))
    if verbose:
        print(describe_load(path, kept, skipped), file=sys.stderr)
    return kept


PROJECT_CSVS = ("summary.csv", "screening.csv", "pairs.csv")     # what generate, evaluate and reconstruct write


def describe_load(path, kept, skipped):
    """'PATH: kept 3 of 5 structures (skipped: 1 unreadable, 1 with > 16 sites; not read: 3 a POSCAR
    beside its CIF)', and what else a user should know: a folder's subfolders and CSV files (other
    than the project's own outputs) go unread, a band gap or ordering was not understood, a
    material id names two rows."""
    why = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()) if r not in NOT_A_CRYSTAL) or "none"
    unused = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()) if r in NOT_A_CRYSTAL)
    why += f"; not read: {unused}" if unused else ""
    total = len(kept) + sum(n for r, n in skipped.items() if r not in NOT_A_CRYSTAL)
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    unread = " and ".join(what for what, there in (
        ("subfolders", any(os.path.isdir(os.path.join(path, n)) for n in names)),
        ("CSV files", any(is_csv(n) for n in names))) if there) if total == 0 else ""
    passed = [(kind, [n for n in names if not n.startswith(".") and test(n)]) for kind, test in (   # not outputs
        ("subfolder", lambda n: os.path.isdir(os.path.join(path, n)) and not _is_structure_file(n)),   # x.cif/: said
        ("CSV file", lambda n: is_csv(n) and n not in PROJECT_CSVS and not n.endswith("_screening.csv")))]
    passed = [(kind + "s" * (len(found) > 1), ", ".join(found[:3]) + ", ..." * (len(found) > 3))
              for kind, found in passed if found] if total else []
    unclear = sum(c.condition_unread for c in kept)
    twice = sorted(n for n, k in collections.Counter(c.material_id for c in kept).items() if k > 1)
    others = total == 0 and not unread and not skipped and any(os.path.isfile(os.path.join(path, n))
                                                                for n in names)        # figures
    return f"{path}: kept {len(kept)} of {total} structure{'s' * (total != 1)} (skipped: {why})" + \
        (f"; its {unread} are not read: name one" if unread else "") + \
        (f"; not read: its {' and '.join(f'{kind} {found}' for kind, found in passed)} (name one to read the "
         f"crystals it holds)"
         if passed else "") + \
        ("; none of its files is a CIF or POSCAR" if others else "") + \
        (f"; {unclear} with a band gap or ordering not understood, taken as unknown" if unclear else "") + \
        (f"; {len(twice)} material id{'s' * (len(twice) != 1)} on more than one row ({', '.join(twice[:3])}"
         f"{', ...' if len(twice) > 3 else ''})" if twice else "")


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ----------------------------------------------------------------------------------------------
# The Materials Project dataset (paper: 52,028 crystals)
# ----------------------------------------------------------------------------------------------

CSV_FIELDS = ["material_id", "pretty_formula", "band_gap", "ordering", "formation_energy_per_atom",
              "e_above_hull", "elements", "cif"]


MP_FIELDS = ["material_id", "structure", "band_gap", "ordering", "formation_energy_per_atom",
             "energy_above_hull"]


def query_materials_project(api_key):
    """Every Materials Project crystal with <= 3 elements and <= 16 sites (the paper's filter) as
    summary documents, through pymatgen's MPRester. Needs a key and network access."""
    from pymatgen.ext.matproj import MPRester
    with MPRester(api_key) as mpr:
        return mpr.summary_search(nelements_max=MAX_ELEMENTS, nsites_max=MAX_SITES, _fields=MP_FIELDS)


def mp_documents_to_rows(documents):
    """Materials Project summary documents (dicts with a pymatgen Structure or its dict under
    'structure') -> rows of the CDVAE-style CSV that `load_structures` reads, with the magnetic
    ordering in an `ordering` column. Documents without a structure are left out."""
    rows = []
    for doc in documents:
        structure = doc.get("structure")
        if structure is None:
            continue
        if isinstance(structure, dict):
            structure = Structure.from_dict(structure)
        rows.append(dict(
            material_id=str(doc.get("material_id", "")),
            pretty_formula=structure.composition.reduced_formula,
            band_gap=doc.get("band_gap", ""),
            ordering=str(doc.get("ordering") or "unknown"),
            formation_energy_per_atom=doc.get("formation_energy_per_atom", ""),
            e_above_hull=doc.get("energy_above_hull", ""),
            elements=str(sorted(e.symbol for e in structure.composition.elements)),
            cif=structure.to(fmt="cif"),
        ))
    return rows


def split_of(material_id, fractions=(0.8, 0.1, 0.1)):
    """'train', 'val' or 'test', decided by a hash of the id: deterministic, and a crystal keeps
    its split when the database grows."""
    u = zlib.crc32(material_id.encode()) / 2**32
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


UMASK = os.umask(0o022)                    # read once (setting it is the only way to read it)
os.umask(UMASK)


@contextlib.contextmanager
def written(path, new=True):
    """Write `path` through a temporary file beside it: `with written(path) as tmp:` write tmp, and
    at the end of the block it becomes `path` (an interrupted or failed write -- a full disk, Ctrl-C
    -- never leaves a half file posing as a whole one, and the error names `path`). The temporary
    file's name is its own (.NAME.xxxx.tmp, made exclusively), so no file of the user's is touched;
    its permissions are what the umask gives a plain open(). new=True: `path` must not exist then
    either (os.link refuses a name that exists: of two commands writing one name, one fails);
    new=False replaces it (a checkpoint saved again)."""
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),      # a name that fits
                                       prefix=f".{os.path.basename(path)[:200]}.", suffix=".tmp")
        os.close(handle)
        try:
            os.chmod(tmp, 0o666 & ~UMASK)     # mkstemp's are private (0600)
        except OSError:                       # a drive without Unix permissions (FAT, some network mounts)
            pass
        yield tmp
        if not new:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                if not os.path.samefile(tmp, path):     # NFS may say so of a link it made
                    raise
            except OSError:                   # a drive without hard links: checked, then renamed
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, "File exists", path) from None
                os.replace(tmp, path)
    except OSError as e:                      # name the file asked for, not the temporary one
        if e.errno is None:                   # not the file system's (gzip's BadGzipFile): as it was
            raise
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        if tmp and os.path.exists(tmp):       # after a failure, or the link: nothing left behind
            os.remove(tmp)


def write_csv(path, rows, fields=CSV_FIELDS):
    """Write rows (dicts; keys outside `fields` are left out) to the new file `path` (`written`).
    The project's one CSV writer: datasets, summary.csv, pairs.csv, screening.csv. A number not
    known (NaN) is an empty cell, as a missing one."""
    with written(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:   # as it is read
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if isinstance(v, (float, np.floating)) and v != v else v for k, v in row.items()}
                         for row in rows)
