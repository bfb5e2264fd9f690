"""Measuring PCCD: round-trip fidelity of the representation, reconstruction statistics
(paper Fig. 1, Table 1, Fig. 2) and the screening of generated crystals (Table 2).

numpy and pymatgen only (and data.py); no torch.
"""
import math
import os
import time

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition

import data


def roundtrip(crystals, noise=0.0, seed=0, length_range=data.DEFAULT_LENGTH_RANGE, tick=None):
    """Encode each crystal, add Gaussian noise of std `noise` to the whole cloud (in its [0, 1]
    units), decode, and compare with the original under StructureMatcher() defaults (tick(1), if
    given, after each).

    Returns dict(n, matched, match_rate, ms_per_decode, failures=[material ids not matched],
    unencoded=['material id (why it cannot be encoded)']).
    """
    rng = np.random.default_rng(seed)
    matcher = StructureMatcher()
    matched, decode_seconds, failures, unencoded = 0, 0.0, [], []
    for crystal in crystals:
        try:
            cloud, elements = data.encode(crystal.structure, length_range=length_range)
        except ValueError as error:      # e.g. a lattice vector outside the length range: say which
            unencoded.append(f"{crystal.material_id} ({error})")
            if tick:
                tick(1)
            continue
        if noise:
            cloud = cloud + rng.normal(0.0, noise, cloud.shape).astype(np.float32)
        start = time.perf_counter()
        try:
            decoded = data.decode(cloud, elements, length_range=length_range)
        except ValueError:
            decoded = None
        decode_seconds += time.perf_counter() - start
        if decoded is not None and matcher.fit(decoded, crystal.structure):
            matched += 1
        else:
            failures.append(crystal.material_id)
        if tick:
            tick(1)
    n = len(crystals)
    return dict(n=n, matched=matched, match_rate=matched / max(n, 1),
                ms_per_decode=1000 * decode_seconds / max(n, 1), failures=failures, unencoded=unencoded)


# ----------------------------------------------------------------------------------------------
# Reconstruction (paper Fig. 1, Table 1, Fig. 2)
# ----------------------------------------------------------------------------------------------

def format_roundtrip(name, noise, r):
    """One line of roundtrip's table (and the first unmatched structures)."""
    line = (f"{name:<40} {noise:>6g} {r['matched']:>6}/{r['n']:<6} {100 * r['match_rate']:>7.2f}% "
            f"{r['ms_per_decode']:>10.1f}")
    more = " ..." if len(r["failures"]) > 8 else ""
    line += f"\n    not matched: {' '.join(r['failures'][:8])}{more}" if r["failures"] else ""
    more = "; ..." if len(r["unencoded"]) > 3 else ""
    return line + (f"\n    not encoded: {'; '.join(r['unencoded'][:3])}{more}" if r["unencoded"] else "")


def greedy_match(frac_coords_a, frac_coords_b, lattice=None):
    """The paper's atom matcher: all pairwise distances under translational symmetry (minimum
    image, so (0, 0, 0) and (1, 1, 1) coincide), then repeatedly pair the closest two atoms that
    are both still unmatched. Distances are Cartesian (A) when a pymatgen Lattice (or 3x3
    matrix) is given, else in fractional units. Returns [(i, j, distance)], closest first."""
    a = np.atleast_2d(np.asarray(frac_coords_a, dtype=float))
    b = np.atleast_2d(np.asarray(frac_coords_b, dtype=float))
    diff = data.periodic_difference(a[:, None, :], b[None, :, :])              # (Na, Nb, 3)
    if lattice is not None:
        diff = diff @ np.asarray(getattr(lattice, "matrix", lattice))
    dist = np.linalg.norm(diff, axis=-1)
    pairs, used_a, used_b = [], set(), set()
    for flat in np.argsort(dist, axis=None, kind="stable"):
        i, j = np.unravel_index(flat, dist.shape)
        if i not in used_a and j not in used_b:
            pairs.append((int(i), int(j), float(dist[i, j])))
            used_a.add(i), used_b.add(j)
            if len(pairs) == min(len(a), len(b)):
                break
    return pairs


def box_statistics(values):
    """Table 1's box-plot numbers: the upper and lower limits, the whisker ends a box plot draws
    (the furthest values inside the fences Q3 + 1.5 IQR and Q1 - 1.5 IQR), and the 'efficiency',
    the share of values inside them (the rest are the plot's outliers)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return dict(n=0, q1=np.nan, median=np.nan, q3=np.nan, upper=np.nan, lower=np.nan, efficiency=np.nan)
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    inside = (v >= q1 - 1.5 * (q3 - q1)) & (v <= q3 + 1.5 * (q3 - q1))      # the median is always inside
    return dict(n=int(v.size), q1=q1, median=median, q3=q3, upper=float(max(v[inside].max(), q3)),  # never
                lower=float(min(v[inside].min(), q1)), efficiency=float(np.mean(inside)))       # inside the box


def compare_reconstruction(original, reconstructed, fig2=False):
    """One pair of the reconstruction experiment (reconstructed is None where decoding failed).
    Lattice errors are relative, (a_hat - a) / a. Atoms are paired with `greedy_match` when the
    counts agree; the paper's coordinate error is the plain difference of fractional
    coordinates (so 0.99 vs 0.01 counts as 0.98, the artefact the paper describes), ours the
    minimum-image difference. `rms` is get_rms_dist under the CDVAE matcher (None: no match);
    with fig2, Fig. 2's RMS anonymous and CrystalNN distances too."""
    out = dict(formula=original.composition.formula, decoded=reconstructed is not None,
               n_original=len(original), n_reconstructed=len(reconstructed) if reconstructed else 0)
    out["same_count"] = reconstructed is not None and len(original) == len(reconstructed)
    out["same_composition"] = reconstructed is not None and reconstructed.composition == original.composition
    out["rms"] = rms_distance(original, reconstructed, cdvae_matcher())
    out["match_default"] = rms_distance(original, reconstructed, default_matcher()) is not None
    if reconstructed is None:
        return out
    out["lattice_original"] = list(original.lattice.abc)
    out["lattice_reconstructed"] = list(reconstructed.lattice.abc)
    out["lattice_rel_error"] = list((np.array(reconstructed.lattice.abc) - original.lattice.abc) / original.lattice.abc)
    if out["same_count"]:
        fa, fb = np.mod(original.frac_coords, 1), np.mod(reconstructed.frac_coords, 1)
        pairs = greedy_match(fa, fb, original.lattice)
        i, j = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        out["coords_original"] = fa[i].tolist()
        out["coords_reconstructed"] = fb[j].tolist()
        out["coord_error_paper"] = (fb[j] - fa[i]).tolist()
        out["coord_error_periodic"] = data.periodic_difference(fb[j], fa[i]).tolist()
        out["mean_match_distance"] = float(np.mean([p[2] for p in pairs]))
    if fig2:
        out["rms_anonymous"] = rms_anonymous_distance(original, reconstructed)
        out["crystalnn"] = crystalnn_distance(original, reconstructed)
    return out


PAIR_FIELDS = ["material_id", "formula", "n_original", "n_reconstructed", "same_count", "same_composition", "rms",
               "match_default", "rms_anonymous", "crystalnn", "mean_match_distance", "decode_error"]
PAPER_TABLE1 = dict(efficiency=[88.48, 90.55, 89.40, 70.83, 71.60, 72.02],
                    upper=[3.81, 3.66, 3.57, 10.05, 5.44, 6.44],
                    lower=[-5.12, -5.23, -4.90, -6.50, -3.84, -4.09])


def csp_scores(originals, predictions):
    """Crystal structure prediction as CDVAE and DiffCSP score it: for each original, its k
    predictions (a list) matched under CDVAE's tolerances. match_1 / rms_1: the first
    prediction; match_k / rms_k: the best of the k (a match if any matches, the smallest RMS
    among those that do). RMS is get_rms_dist's, normalised by (V / n)^(1/3). shortest_1 and
    crowding_1: how physical the first prediction is (None where it did not decode)."""
    rows = []
    for original, predicted in zip(originals, predictions):
        rms = [rms_distance(original, p) for p in predicted]
        matched = [r for r in rms if r is not None]
        first = predicted[0]
        rows.append(dict(match_1=rms[0] is not None, rms_1=rms[0], match_k=bool(matched),
                         rms_k=min(matched) if matched else None,
                         shortest_1=first and round(shortest_distance(first), 4),
                         crowding_1=first and round(crowding(first), 4)))
    return rows


def summarise_csp(rows, k):
    mean = lambda key: float(np.mean([r[key] for r in rows if r[key] is not None] or [np.nan]))  # noqa: E731
    share = lambda test: float(np.mean([r["shortest_1"] is not None and test(r) for r in rows]))  # noqa: E731
    return dict(n=len(rows), k=k, match_rate_1=float(np.mean([r["match_1"] for r in rows])), rmse_1=mean("rms_1"),
                match_rate_k=float(np.mean([r["match_k"] for r in rows])), rmse_k=mean("rms_k"),
                decoded_1=share(lambda r: True), closer_than_1A_1=share(lambda r: r["shortest_1"] < 1.0),
                crowded_1=share(lambda r: r["crowding_1"] < CROWDED_BELOW))


def format_csp(summary):
    """The match rates beside the published ones on the MP-20 test split (27,136 training crystals
    there; summary['train_crystals'] here)."""
    def rmse(value):                       # NaN where nothing matched
        return f"{value:>9.4f}" if value == value else f"{'-':>9}"
    best = [f"{'best of k = ' + str(summary['k']):<28}{100 * summary['match_rate_k']:>8.2f}%{rmse(summary['rmse_k'])}"]
    return "\n".join([
        f"\nStructure prediction of {summary['n']} composition{'s' * (summary['n'] != 1)}, "
        f"{summary['k']} sample{'s' * (summary['k'] > 1)} each "
        f"({describe_sampler(**summary)}; {summary['seconds']:.0f} s; "
        f"StructureMatcher stol 0.5, ltol 0.3, angle_tol 10, volumes scaled)",
        *([f"drawn from {summary['data_loaded']}"] if "data_loaded" in summary else []),
        f"{'':<28}{'match':>9}{'RMSE':>9}",
        f"{'first sample (k = 1)':<28}{100 * summary['match_rate_1']:>8.2f}%{rmse(summary['rmse_1'])}",
        *(best if summary["k"] > 1 else []),
        f"first samples: {100 * summary['decoded_1']:.2f}% decoded; with a pair closer than 1.0 A: "
        f"{100 * summary['closer_than_1A_1']:.2f}%, crowded (d < {CROWDED_BELOW} (r_i + r_j)): "
        f"{100 * summary['crowded_1']:.2f}%, P1 (symprec 0.1): {100 * summary['p1_1']:.2f}%"
        + (f" ({100 * summary['p1_1_before_symmetrising']:.2f}% before symmetrising)"
           if "p1_1_before_symmetrising" in summary else "") + f" (of all {summary['n']})",
        f"published on MP-20's test split, 27,136 training crystals (this model: {summary['train_crystals']:,}):",
        "  CDVAE   k = 1: 33.90% RMSE 0.1045   k = 20: 66.95% RMSE 0.1026",
        "  DiffCSP k = 1: 51.49% RMSE 0.0631   k = 20: 77.93% RMSE 0.0492"])


def summarise_reconstruction(pairs, train_compositions):
    """The experiment's numbers from its pairs: atom-count accuracy (and the no-model baseline),
    match rates, and Table 1's box-plot statistics of the errors in % for equal counts (lattice
    a, b, c and coordinates x, y, z as the paper measures them; `table1_periodic_coords` with
    the minimum-image coordinate error)."""
    n = len(pairs)
    same = [p for p in pairs if p["same_count"]]
    matched = [p["rms"] for p in pairs if p["rms"] is not None]
    errors = lambda key: np.array([e for p in same for e in p[key]]).reshape(-1, 3).T  # noqa: E731
    summary = dict(
        n=n, decoded=sum(p["decoded"] for p in pairs),
        atom_count_accuracy=len(same) / n,
        composition_accuracy=sum(p["same_composition"] for p in pairs) / n,        # each element's count too
        count_baseline_accuracy=most_common_count_baseline([p["formula"] for p in pairs], train_compositions),
        match_rate=len(matched) / n, mean_rms=float(np.mean(matched)) if matched else None,
        match_rate_default=sum(p["match_default"] for p in pairs) / n,
        table1={k: box_statistics(100 * v) for k, v in
                zip("abcxyz", [*errors("lattice_rel_error"), *errors("coord_error_paper")])},
        table1_periodic_coords={k: box_statistics(100 * v) for k, v in zip("xyz", errors("coord_error_periodic"))},
    )
    for key in ("rms_anonymous", "crystalnn"):
        values = [p[key] for p in pairs if p.get(key) is not None]
        summary[f"mean_{key}"], summary[f"n_{key}"] = (float(np.mean(values)) if values else None), len(values)
    return summary


def describe_sampler(sampler, steps, guidance, condition_above, refine=0, physics=False, t=None, symmetrised=0, **_):
    """'ddpm, guidance 3' or 'ddim, 100 steps, guidance 3 at steps >= 250, no condition below,
    refined 5 times, physics-aware, symmetrised at 0.5 A' (from t: reconstruction's start, steps
    t - 1 down to 0)."""
    words = sampler if sampler == "ddpm" else f"ddim, {steps} step{'s' * (steps != 1)}"
    if (999 if t is None else t - 1) < condition_above:          # the first step, T - 1 = 999 or t - 1
        words += f", no condition (every step below {condition_above})"
    else:
        words += f", guidance {guidance:g}" + (f" at steps >= {condition_above}, no condition below"
                                               if condition_above else "")
    return words + (f", refined {refine} times" if refine else "") + (", physics-aware" if physics else "") \
        + (f", symmetrised at {symmetrised:g} A" if symmetrised else "")


def format_reconstruction(summary):
    """The summary beside the paper's numbers (atom count, Table 1)."""
    n, rms = summary["n"], summary["mean_rms"]
    lines = [f"\nReconstruction from t = {summary['t']} of {n} structures ({describe_sampler(**summary)}, "
             f"{summary['seconds']:.0f} s; {summary['checkpoint']})",
             *([f"  drawn from {summary['data_loaded']}"] if "data_loaded" in summary else []),
             f"  decoded                       {summary['decoded']:>5}/{n}",
             f"  atom count right              {100 * summary['atom_count_accuracy']:6.2f}%   (paper, t = T: 67.81%; "
             f"most-common-count baseline: {100 * summary['count_baseline_accuracy']:.2f}%)",
             f"  composition right             {100 * summary['composition_accuracy']:6.2f}%   (each element's count; "
             f"Table 1 pairs atoms of equal counts by position alone)",
             f"  StructureMatcher match        {100 * summary['match_rate']:6.2f}%   mean RMS "
             f"{'-' if rms is None else f'{rms:.4f}'}  (stol 0.5, ltol 0.3, angle_tol 10)",
             f"  StructureMatcher() match      {100 * summary['match_rate_default']:6.2f}%   "
             f"(pymatgen's default tolerances: stol 0.3, ltol 0.2, angle_tol 5)"]
    for key, name in (("rms_anonymous", "RMS anonymous distance"), ("crystalnn", "CrystalNN fingerprint distance")):
        if summary.get(f"mean_{key}") is not None:       # over the pairs pymatgen could compare
            lines.append(f"  mean {name:<31}{summary[f'mean_{key}']:8.4f}   ({summary[f'n_{key}']} of {n} pairs)")
    lines.append(f"\n{'  Table 1 (for equal atom counts; errors in %)':<50}" + "".join(f"{c:>9}" for c in "abcxyz"))
    def cell(value):                       # NaN where no pair has the right atom count
        return f"{value:9.2f}" if value == value else f"{'-':>9}"
    for key, label in (("efficiency", "Efficiency"), ("upper", "Upper limit"), ("lower", "Lower limit")):
        scale = 100 if key == "efficiency" else 1
        ours = "".join(cell(row[key] * scale) for row in summary["table1"].values())
        lines.append(f"  {label:<13} ours                              {ours}")
        lines.append(f"  {'':<13} paper, t = T                      {''.join(f'{v:9.2f}' for v in PAPER_TABLE1[key])}")
    ours = "".join(cell(row["efficiency"] * 100) for row in summary["table1_periodic_coords"].values())
    lines.append(f"{'  Efficiency, minimum-image coordinate error (ours)':<77}{ours}")
    return "\n".join(lines)


def cdvae_matcher():
    """The field's reconstruction matcher (CDVAE's and DiffCSP's compute_metrics.py)."""
    return StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)


def default_matcher():
    """pymatgen's StructureMatcher() at its default tolerances (stol 0.3, ltol 0.2, angle_tol 5):
    stricter than the field's reconstruction matcher."""
    return StructureMatcher()


def rms_distance(original, reconstructed, matcher=None):
    """get_rms_dist()[0] under the CDVAE matcher, or None when the two do not match."""
    if reconstructed is None:
        return None
    try:
        rms = (matcher or cdvae_matcher()).get_rms_dist(reconstructed, original)
    except Exception:              # pymatgen can fail on degenerate cells: count as no match
        return None
    return None if rms is None else float(rms[0])


def rms_anonymous_distance(original, reconstructed):
    """Fig. 2e: RMS distance after the best mapping of species onto species (StructureMatcher's
    get_rms_anonymous), or None when no mapping fits."""
    try:
        rms, _ = StructureMatcher().get_rms_anonymous(reconstructed, original)
    except Exception:
        return None
    return None if rms is None else float(rms)


def crystalnn_fingerprint(structure, max_cn=24):
    """A structure fingerprint from pymatgen's CrystalNN: for every site, the CrystalNN weights
    of coordination numbers 1..max_cn; the structure's fingerprint is their mean over sites."""
    from pymatgen.analysis.local_env import CrystalNN
    cnn = CrystalNN()
    fingerprint = np.zeros(max_cn)
    for i in range(len(structure)):
        for cn, weight in cnn.get_nn_data(structure, i).cn_weights.items():
            if 1 <= cn <= max_cn:
                fingerprint[cn - 1] += weight
    return fingerprint / max(len(structure), 1)


def crystalnn_distance(original, reconstructed):
    """Fig. 2c (in spirit): Euclidean distance between the CrystalNN coordination fingerprints."""
    try:
        return float(np.linalg.norm(crystalnn_fingerprint(original) - crystalnn_fingerprint(reconstructed)))
    except Exception:
        return None


def most_common_count_baseline(test_compositions, train_compositions):
    """The share of test crystals whose atom count equals the most common atom count of
    training crystals with the same element set (or of all training crystals, when the set is
    new): what 'reconstruction' at t = T scores with no model at all."""
    from collections import Counter
    by_set, overall = {}, Counter()
    for comp in train_compositions:
        comp = Composition(comp)
        key = frozenset(e.symbol for e in comp.elements)
        by_set.setdefault(key, Counter())[int(comp.num_atoms)] += 1
        overall[int(comp.num_atoms)] += 1
    hits = 0
    for comp in test_compositions:
        comp = Composition(comp)
        counts = by_set.get(frozenset(e.symbol for e in comp.elements), overall)
        hits += counts.most_common(1)[0][0] == int(comp.num_atoms)
    return hits / max(len(test_compositions), 1)


# ----------------------------------------------------------------------------------------------
# Screening generated crystals (the paper's "initial screening", Table 2)
# ----------------------------------------------------------------------------------------------

def shortest_distance(structure, own_images=True):
    """Shortest distance (A) between two atoms, periodic images included: an atom and its own
    nearest image too (a one-atom cell has one), unless own_images=False (CDVAE's validity, where
    a one-atom cell has none: inf)."""
    pairs = float((structure.distance_matrix + np.diag(np.full(len(structure), np.inf))).min()) \
        if len(structure) > 1 else float("inf")
    return min(pairs, shortest_lattice_vector(structure.lattice)) if own_images else pairs


def space_group(structure):
    """The space group's symbol at symprec 0.1 ('?' where spglib finds none)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
    try:
        return SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_symbol()
    except Exception:
        return "?"


def describe(structure):
    """formula, atoms, space group (symprec 0.1), density, shortest distance and the decoder's
    merges: the descriptive columns of a screening table."""
    return dict(formula=data.formula(structure.composition), n_atoms=len(structure),
                spacegroup=space_group(structure), density=round(float(structure.density), 4),
                shortest_distance=round(shortest_distance(structure), 4),
                atoms_merged=structure.properties.get("atoms_merged", ""))


def structurally_valid(structure, cutoff=0.5):
    """CDVAE's structural validity: every distance between two sites >= 0.5 A (an atom's own images
    not counted), volume >= 0.1 A^3."""
    return shortest_distance(structure, own_images=False) >= cutoff and structure.volume >= 0.1


CHARGE_BALANCE_LIMIT = 10**7   # assignments; pymatgen takes ~0.15 s for 3.7e5, minutes for 1e9


def compositionally_valid(composition):
    """A charge-balanced assignment of common oxidation states exists (pymatgen's
    oxi_state_guesses), or the compound is one element or all metals (an alloy). Judged on the
    reduced formula, as CDVAE's check is: a crystal and its supercell alike (mixed valence in a
    doubled cell does not count). None (not judged) where the guess would try more than
    CHARGE_BALANCE_LIMIT assignments: per element, the multisets of its states over its atoms
    (many atoms of many-valent elements; never a crystal of <= 16 sites)."""
    composition = Composition(composition).reduced_composition
    elements = composition.elements
    if len(elements) == 1 or all(e.is_metal for e in elements):
        return True
    assignments = math.prod(math.comb(int(round(n)) + k - 1, k - 1) for n, k in (
        (n, max(1, len(e.icsd_oxidation_states or e.oxidation_states))) for e, n in composition.items()))
    if assignments > CHARGE_BALANCE_LIMIT:
        return None
    return len(composition.oxi_state_guesses()) > 0


# ---- Is it physical? CDVAE's validity passes atoms 0.5 A apart; a chemist would not ---------

CROWDED_BELOW = 0.7         # d / (r_i + r_j) below this: crowded. 20 of the 11,359 bundled training
#                             crystals are (U, Pu, Ce metals and alloys, Cs, Rb on 3 A axes); 11 of 6,361 val
VOLUME_BAND = (0.5, 2.0)    # V / V_predicted outside this: not a plausible cell. Of the bundled
#                             val crystals 21 of 6,361 are outside


def shortest_lattice_vector(lattice):
    """The length (A) of the shortest nonzero lattice vector: how far an atom is from its own
    nearest image. Searched over the combinations of -1, 0, 1 of the LLL-reduced basis."""
    combinations = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                             if (i, j, k) != (0, 0, 0)])
    return float(np.linalg.norm(combinations @ lattice.get_lll_reduced_lattice().matrix, axis=1).min())


def crowding(structure):
    """The shortest interatomic distance relative to what the two atoms' covalent radii allow:
    min over pairs i, j of atoms and periodic images of d_ij / (r_i + r_j) -- an atom and its own
    images too, unlike CDVAE's validity (Cu in a 0.7 A cube is crowded). A bonded pair is near 1
    (an O-O pair at 1.0 A is 0.76, Mn-O at 1.0 A is 0.46)."""
    radii = np.array([data.covalent_radius(site.specie.symbol) for site in structure])
    own = shortest_lattice_vector(structure.lattice) / (2 * radii)          # each atom and its images
    d = structure.distance_matrix / (radii[:, None] + radii[None, :])
    return float(min((d + np.diag(np.full(len(structure), np.inf))).min(), own.min()))


VOLUME_PRIOR_WEIGHT = 0.01   # lambda of atomic_volumes: how much an element's radius counts against the data


def atomic_volumes(reference):
    """Per-element volumes v_e (A^3) such that a crystal's volume is about sum_e n_e v_e, fitted
    to the reference crystals by least squares on the relative error, held near a prior where the
    crystals say little: minimise
        sum_i (sum_e n_ie v_e / V_i - 1)^2 + lambda sum_e ((v_e - k r_e^3) / v_mean)^2,
    with r_e the covalent radius, k the one constant that best fits V_i ~ k sum_e n_ie r_e^3, v_mean
    the mean volume per atom and lambda = VOLUME_PRIOR_WEIGHT. Fitted on the 11,359 bundled training
    crystals it predicts the 6,361 unseen val crystals' volumes to within 0.87-1.24 of the truth for
    90% of them (the prior moves no element there by more than 2%: Xe, Kr); fitted on 60 of them,
    1.3% of the val crystals fall outside 0.5-2 of their prediction (without the prior: 22.6%,
    fewer crystals than elements leaving most v_e undetermined)."""
    symbols = sorted({e.symbol for s in reference for e in s.composition.elements})
    if not symbols:
        return {}
    column = {e: j for j, e in enumerate(symbols)}
    A = np.zeros((len(reference), len(symbols)))
    for i, s in enumerate(reference):
        for e, n in s.composition.items():
            A[i, column[e.symbol]] = n / s.volume
    r3 = np.array([data.covalent_radius(e) ** 3 for e in symbols])
    k = np.sum(A @ r3) / np.sum((A @ r3) ** 2)              # least squares of sum_i (k (A r^3)_i - 1)^2
    v_mean = np.mean([s.volume / len(s) for s in reference])
    weight = math.sqrt(VOLUME_PRIOR_WEIGHT) / v_mean
    v = np.linalg.lstsq(np.vstack([A, weight * np.eye(len(symbols))]),
                        np.concatenate([np.ones(len(reference)), weight * k * r3]), rcond=None)[0]
    return {e: float(x) for e, x in zip(symbols, v) if x > 0}


def element_volume(symbol, volumes):
    """v_e of `atomic_volumes`; an element they lack gets k r_e^3 (r its covalent radius), with k
    the median of v_e / r_e^3 over the fitted elements."""
    if symbol in volumes:
        return volumes[symbol]
    k = np.median([v / data.covalent_radius(e) ** 3 for e, v in volumes.items()]) if volumes else 6.0
    return k * data.covalent_radius(symbol) ** 3


def predicted_volume(composition, volumes):
    """sum_e n_e v_e (`element_volume`)."""
    return sum(n * element_volume(e.symbol, volumes) for e, n in Composition(composition).items())


def wasserstein_1d(u, v):
    """Earth mover's distance between two samples of numbers: the area between their empirical
    cumulative distribution functions, integral |F_u(x) - F_v(x)| dx (CDVAE's density and
    number-of-elements distances). W([0], [1]) = 1; W([0, 1], [0, 1]) = 0."""
    u, v = np.sort(np.asarray(u, dtype=float)), np.sort(np.asarray(v, dtype=float))
    if len(u) == 0 or len(v) == 0:
        return float("nan")
    x = np.concatenate([u, v])
    x.sort()
    F_u = np.searchsorted(u, x[:-1], side="right") / len(u)     # both CDFs on each interval
    F_v = np.searchsorted(v, x[:-1], side="right") / len(v)
    return float(np.sum(np.abs(F_u - F_v) * np.diff(x)))


# ---- Screening: one row per crystal, one summary -------------------------------------------

def unique_flags(structures, tick=lambda share: None):
    """True for the first structure of each group that StructureMatcher finds equivalent."""
    matcher = StructureMatcher()
    flags, kept = [], []
    for s in structures:
        is_new = not any(s.composition.reduced_formula == k.composition.reduced_formula
                         and matcher.fit(s, k) for k in kept)
        flags.append(is_new)
        if is_new:
            kept.append(s)
        tick(1 / 3)                  # a third of screening one structure (for progress lines)
    return flags


def novel_flags(structures, reference, tick=lambda share: None):
    """True where no reference (training) structure of the same reduced composition matches
    under StructureMatcher: the paper's 'novel discoveries'."""
    matcher = StructureMatcher()
    by_formula = {}
    for r in reference:
        by_formula.setdefault(r.composition.reduced_formula, []).append(r)
    flags = []
    for s in structures:
        flags.append(not any(matcher.fit(s, r) for r in by_formula.get(s.composition.reduced_formula, [])))
        tick(1 / 3)
    return flags


SCREENING_FIELDS = ["name", "elements", "formula", "n_atoms", "spacegroup", "density", "shortest_distance",
                    "crowding", "volume_ratio", "atoms_merged", "decoded", "structural", "compositional",
                    "valid", "unique", "novel", "crowded", "physical", "reason"]   # generate's summary.csv


def screen(structures, reference, tick=lambda share: None):
    """Per-structure screening rows (None entries are crystals that could not be decoded) and a
    summary: Table 2's counts (CDVAE's validity), and whether the crystals are physical --
    crowding, volume against the reference's per-element volumes, P1 share, and CDVAE's
    distribution distances to the reference. Without a reference, novelty and volume are not
    judged: each row's `novel` is '' and the summary has no novelty counts, but `no_reference`.
    tick(share) is called as each third of a structure's screening is done."""
    decoded = [s for s in structures if s is not None]
    unique = iter(unique_flags(decoded, tick))
    novel = iter(novel_flags(decoded, reference, tick) if reference else [""] * len(decoded))
    volumes = atomic_volumes(reference)
    rows = []
    for s in structures:
        if s is None:
            rows.append(dict(decoded=False))
            continue
        row = describe(s)
        structural = structurally_valid(s)
        judged = compositionally_valid(s.composition)
        compositional = bool(judged)
        fitted = volumes and all(e.symbol in volumes for e in s.composition)    # Ar, Po: no volume to judge by
        ratio = round(s.volume / predicted_volume(s.composition, volumes), 4) if fitted else float("nan")
        closeness = round(crowding(s), 4)                      # the flags follow the numbers written
        crowded = closeness < CROWDED_BELOW
        plausible = not fitted or VOLUME_BAND[0] <= ratio <= VOLUME_BAND[1]    # unjudged: counted, and said
        row.update(decoded=True, structural=structural, compositional=compositional if judged is not None else "",
                   valid=structural and compositional, unique=next(unique), novel=next(novel),
                   crowding=closeness, crowded=crowded, volume_ratio=ratio,
                   physical=structural and compositional and not crowded and plausible)
        rows.append(row)
        tick(1 / 3 if reference else 2 / 3)
    summary = summarise_screening(rows)
    if not reference:                    # no number that would read as "all novel"
        for key in ("novel", "valid_novel", "valid_unique_novel", "physical_unique_novel", "volume_not_judged"):
            summary.pop(key, None)                                   # volume: said as not judged, below
        summary["no_reference"] = True
    valid = [s for s, r in zip(structures, rows) if r.get("valid")]
    summary.update(
        w_density=wasserstein_1d([s.density for s in valid], [s.density for s in reference]),
        w_elements=wasserstein_1d([len(s.composition) for s in valid], [len(s.composition) for s in reference]))
    if any("atoms_merged" in s.properties for s in decoded) or not decoded:   # decoded by PCCD
        summary["crystals_with_merges"] = sum(s.properties.get("atoms_merged", 0) > 0 for s in decoded)
    return rows, summary


def summarise_screening(rows):
    n = len(rows)
    ok = [r for r in rows if r["decoded"]]
    valid = [r for r in ok if r["valid"]]
    count = lambda rs, key: sum(bool(r[key]) for r in rs)  # noqa: E731
    def median(key):                      # over the judged: a volume ratio is NaN where not judged
        judged = [r[key] for r in ok if r[key] == r[key]]
        return float(np.median(judged)) if judged else float("nan")
    return dict(generated=n, decoded=len(ok), structural=count(ok, "structural"),
                compositional=count(ok, "compositional"), valid=len(valid),
                unique=count(ok, "unique"), novel=count(ok, "novel"),
                valid_unique=count(valid, "unique"), valid_novel=count(valid, "novel"),
                valid_unique_novel=sum(bool(r["unique"] and r["novel"]) for r in valid),
                crowded=count(ok, "crowded"), closer_than_1A=sum(r["shortest_distance"] < 1.0 for r in ok),
                p1=sum(r["spacegroup"] == "P1" for r in ok), physical=count(ok, "physical"),
                **({"no_spacegroup": n} if (n := sum(r["spacegroup"] == "?" for r in ok)) else {}),
                physical_unique_novel=sum(bool(r["physical"] and r["unique"] and r["novel"]) for r in ok),
                median_shortest_distance=median("shortest_distance"), median_volume_ratio=median("volume_ratio"),
                **({"volume_not_judged": n} if (n := sum(r["volume_ratio"] != r["volume_ratio"] for r in ok)) else {}),
                **({"charge_balance_not_judged": n} if (n := sum(r["compositional"] == "" for r in ok)) else {}))


def format_screening(summary):
    """The summary in the layout of Table 2's first rows, then how physical the crystals are
    (and how they were sampled, for generate's own)."""
    n = max(summary["generated"], 1)
    seconds = summary.get("seconds", 0)
    lines = [f"\nGenerated {n} crystal{'s' * (n != 1)}, sampled in {seconds:.{1 if seconds < 10 else 0}f} s "
             f"({describe_sampler(**summary)}; {summary['checkpoint']})"] if "sampler" in summary else []
    lines.append(f"{'generated' if 'sampler' in summary else 'screened':<38}{summary['generated']:>6}")   # evaluate's
    for key, label in (("decoded", "decodable"), ("structural", "structurally valid"),
                       ("compositional", "compositionally valid"), ("valid", "valid (both)"),
                       ("unique", "unique"), ("novel", "novel"), ("valid_unique", "valid and unique"),
                       ("valid_novel", "valid and novel"),
                       ("valid_unique_novel", "valid, unique and novel"),
                       ("crystals_with_merges", "(decoder merged atoms on one spot)"),
                       ("uncommitted", "(not committed to an atom layout)"),
                       ("missing_elements", "(without an element asked for)"),
                       ("charge_balance_not_judged", f"(charge not judged: > {CHARGE_BALANCE_LIMIT:.0e} ways)"),
                       ("closer_than_1A", "a pair closer than 1.0 A"),
                       ("crowded", f"crowded (d < {CROWDED_BELOW} (r_i + r_j))"), ("p1", "P1 (symprec 0.1)"),
                       ("p1_before_symmetrising", "  before symmetrising"),
                       ("no_spacegroup", "(no space group: atoms on one spot?)"),
                       ("volume_not_judged", "(V not judged: element volume unknown)"),
                       ("physical", "physical (valid, uncrowded, V ok or unjudged)"),
                       ("physical_unique_novel", "physical, unique and novel")):
        if key in summary:     # crystals_with_merges: generate only (decoded by this project)
            lines.append(f"{label:<38}{summary[key]:>6}  {100 * summary[key] / n:6.2f}%")
    if summary.get("no_reference"):
        lines.append("(novelty and volume not judged: no reference structures)")
    number = lambda x, f=".3f": "     -" if x is None or x != x else f"{x:>6{f}}"   # noqa: E731  (NaN: none to judge)
    lines.append(f"{'median shortest distance':<38}{number(summary['median_shortest_distance'], '.2f')} A")
    judged = summary["decoded"] - summary.get("volume_not_judged", 0)
    lines.append(f"{'median V / V_pred':<38}{number(summary['median_volume_ratio'], '.2f')}"
                 + (f"  (of the {judged} judged)" if judged and "volume_not_judged" in summary else ""))
    lines.append(f"{'Wasserstein to reference: density':<38}{number(summary['w_density'])} g/cm3")
    lines.append(f"{'  number of elements':<38}{number(summary['w_elements'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Figures (paper Fig. 1, S1, S2, S4), drawn with matplotlib, which comes with pymatgen
# ----------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib without a screen: the one plotting set-up (whatever MPLBACKEND says)."""
    os.environ["MPLBACKEND"] = "Agg"                 # read when matplotlib is imported
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi, new=True):
    """fig to path (its format from the suffix) through data.written: never a half-drawn file."""
    try:
        with data.written(path, new=new) as tmp:
            fig.savefig(tmp, dpi=dpi, format=os.path.splitext(path)[1][1:].lower() or "png")
    finally:
        pyplot().close(fig)


def plot_cloud(cloud, elements, formula, path):
    """Fig. S1: the three channels of one crystal's (3, 128, 3) cloud; `formula` as its title."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 5.6), sharey=True)
    titles = ["channel 0\nfractional x, y, z", "channel 1\nelement slot",
              "channel 2\nangles (rows 0-63), lengths (64-127)"]
    for ax, channel, title in zip(axes, cloud, titles):
        im = ax.imshow(channel, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=title, xlabel="column")
    for ax, names in zip(axes, (["x", "y", "z"], [*elements, "", ""][:3], ["α | a", "β | b", "γ | c"])):
        ax.set_xticks([0, 1, 2], names)
    axes[0].set_ylabel("point (atom i fills 128 // n consecutive rows)")
    fig.subplots_adjust(top=0.84, right=0.88)
    fig.colorbar(im, cax=fig.add_axes([0.9, 0.15, 0.015, 0.65]), label="value (every channel in [0, 1])")
    fig.suptitle(f"{formula}: the (3, 128, 3) PCCD cloud (paper Fig. S1)")
    save_figure(fig, path, dpi=110)


def plot_prediction(true, predicted, path, title):
    """A predicted structure beside the true one (Fig. 1 style): each atom's fractional x, y, z
    (the image nearest the true one, no origin shift) and the lattice lengths, predicted against
    true, atoms paired by the greedy matcher; `title` names the crystal and how it scored."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    pairs = greedy_match(true.frac_coords, predicted.frac_coords, true.lattice.matrix)
    for j, (axis, marker) in enumerate(zip("xyz", "os^")):   # minimum image: the predicted value nearest the true
        x = np.array([true.frac_coords[a, j] for a, _, _ in pairs])
        y = x + data.periodic_difference([predicted.frac_coords[b, j] for _, b, _ in pairs], x)
        axes[0].scatter(x, y, label=axis, s=[60, 35, 15][j], marker=marker, alpha=0.7)   # equal values stay visible
    for j, (length, marker, true_length, predicted_length) in enumerate(zip("abc", "os^", true.lattice.abc,
                                                                         predicted.lattice.abc)):
        axes[1].scatter([true_length], [predicted_length], marker=marker, s=[90, 50, 20][j], alpha=0.7, label=length)
    longest = 1.1 * max(*true.lattice.abc, *predicted.lattice.abc)
    for ax, name, lim in ((axes[0], "fractional coordinates (nearest image)", (-0.5, 1.5)),
                          (axes[1], "lattice lengths (Å)", (0, longest))):
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(title=name, xlabel="true", ylabel="predicted", xlim=lim, ylim=lim)
        ax.legend()
    fig.suptitle(f"{true.composition.formula.replace(' ', '')}: predicted from its composition alone\n{title}")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    save_figure(fig, path, dpi=110)


def plot_loss(losses, held_out, path, held_out_name="held-out loss"):
    """Fig. S4: the training loss (L1, Eq. S4) per step, its running mean (over 10 steps or a
    50th of the run, whichever is more) and the held-out loss at each checkpoint ((step, loss))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.5, alpha=0.4, label="batch loss")
    window = max(10, len(losses) // 50)
    if len(losses) >= 2 * window:                           # a mean over most of the run says nothing
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window, smooth, label=f"mean of {window} steps")
    if held_out:
        ax.plot(*zip(*held_out), "o", ms=4, label=f"{held_out_name} (EMA weights)")
    ax.set(xlabel="step", ylabel="L1 loss (Eq. S4)", yscale="log", title="PCCD training loss")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120, new=False)              # a resumed run draws its whole curve again


def plot_reconstruction(pairs, summary, path):
    """Fig. 1: parity plots of lattice lengths (a) and coordinates (b), the atom-count heatmap
    (c), box plots of the lattice (d) and coordinate (e) errors."""
    plt = pyplot()
    same = [p for p in pairs if p["same_count"]]
    fig, ax = plt.subplots(2, 3, figsize=(14, 8.5))
    ax = ax.ravel()
    if same:
        lo = np.array([p["lattice_original"] for p in same]).ravel()
        hi = np.array([p["lattice_reconstructed"] for p in same]).ravel()
        ax[0].scatter(lo, hi, s=6, alpha=0.5)
        m = max(lo.max(), hi.max())
        ax[0].plot([0, m], [0, m], "k--", lw=0.8)
        co = np.concatenate([p["coords_original"] for p in same]).ravel()
        cr = np.concatenate([p["coords_reconstructed"] for p in same]).ravel()
        ax[1].scatter(co, cr, s=4, alpha=0.3)
        ax[1].plot([0, 1], [0, 1], "k--", lw=0.8)
    ax[0].set(title="a. lattice lengths (equal counts)", xlabel="original (Å)", ylabel="reconstructed (Å)")
    ax[1].set(title="b. fractional coordinates (matched atoms)", xlabel="original", ylabel="reconstructed")
    counts = np.zeros((18, 18))                           # 17: more than 16 atoms decoded
    for p in pairs:
        counts[min(p["n_reconstructed"], 17), p["n_original"]] += 1
    im = ax[2].imshow(counts, origin="lower", cmap="viridis")
    fig.colorbar(im, ax=ax[2], label="structures").ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax[2].plot([0, 16], [0, 16], "w--", lw=0.6)
    ticks = [0, 4, 8, 12, 16]
    ax[2].set_xticks(ticks)
    ax[2].set_yticks(ticks[:-1] + [17], [*map(str, ticks[:-1]), ">16"])
    ax[2].set(title=f"c. atom counts: {100 * summary['atom_count_accuracy']:.1f}% on the diagonal",
              xlabel="original", ylabel="reconstructed (0 = not decoded)")
    errors = [100 * np.array([p["lattice_rel_error"][k] for p in same]) for k in range(3)]
    ax[3].boxplot(errors)
    ax[3].set_xticks([1, 2, 3], ["a", "b", "c"])
    ax[3].set(title="d. lattice length relative error (%)")
    errors_xyz = [100 * np.concatenate([np.array(p[key])[:, k] for p in same]) if same else []
                  for key in ("coord_error_paper", "coord_error_periodic") for k in range(3)]
    ax[4].boxplot(errors_xyz)
    ax[4].set_xticks(range(1, 7), ["x", "y", "z", "x*", "y*", "z*"])
    ax[4].set(title="e. coordinate error (% of cell; * minimum image)")
    for panel, values in ((ax[3], errors), (ax[4], errors_xyz)):   # the boxes readable, the outliers counted
        beyond = sum(int(np.sum(np.abs(v) > 30)) for v in values)
        panel.set_ylim(-30, 30)
        if beyond:
            panel.set_xlabel(f"{beyond} plotted value{'s' * (beyond != 1)} beyond ±30% not shown (whiskers cut)")
    rms = [p["rms"] for p in pairs if p["rms"] is not None]
    ax[5].hist(rms, bins=20)
    if not rms:
        ax[5].text(0.5, 0.5, "no matched pairs", ha="center", transform=ax[5].transAxes)
    ax[5].set(title=f"f. matched pairs ({100 * summary['match_rate']:.1f}%, CDVAE tolerances)",
              xlabel="get_rms_dist (normalised)", ylabel="structures")
    fig.suptitle(f"PCCD reconstruction from t = {summary['t']}, {summary['n']} structures")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_trajectory(trajectory, elements, path):
    """Fig. S2: one sample's points, coloured by element, as the noise is removed: six of the
    steps in `trajectory` ({t: cloud}), from the first to the last, which holds the final cloud
    (after any refinement). Coordinates are drawn modulo 1, as the decoder reads them."""
    plt = pyplot()
    times = sorted(trajectory, reverse=True)
    times = sorted(set(times[:: max(1, len(times) // 5)] + [times[-1]]), reverse=True)
    fig = plt.figure(figsize=(3.2 * len(times), 3.6))
    for k, t in enumerate(times):
        cloud = trajectory[t].numpy()
        ax = fig.add_subplot(1, len(times), k + 1, projection="3d")
        slot = cloud[1, :, : len(elements)].argmax(1)
        for j, symbol in enumerate(elements):
            p = cloud[0][slot == j] % 1.0
            ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=6, label=symbol)
        ax.set(title="final" if k == len(times) - 1 else f"after step {t}", xlim=(0, 1), ylim=(0, 1), zlim=(0, 1),
               xticks=[], yticks=[], zticks=[])
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(elements), fontsize=8)
    fig.suptitle("Generation of one crystal: points coloured by element (paper Fig. S2)")
    save_figure(fig, path, dpi=110)
