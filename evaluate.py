"""Measuring PCCD: round-trip fidelity of the representation, reconstruction statistics
(paper Fig. 1, Table 1, Fig. 2) and the screening of generated crystals (Table 2).

numpy and pymatgen only (and data.py); no torch.
"""
import time

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher

import data


def roundtrip(crystals, noise=0.0, seed=0, length_range=data.DEFAULT_LENGTH_RANGE):
    """Encode each crystal, add Gaussian noise of std `noise` to the whole cloud (in its [0, 1]
    units), decode, and compare with the original under StructureMatcher() defaults.

    Returns dict(n, matched, match_rate, ms_per_decode, failures=[material ids]).
    """
    rng = np.random.default_rng(seed)
    matcher = StructureMatcher()
    matched, decode_seconds, failures = 0, 0.0, []
    for crystal in crystals:
        cloud, elements = data.encode(crystal.structure, length_range=length_range)
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
    n = len(crystals)
    return dict(n=n, matched=matched, match_rate=matched / max(n, 1),
                ms_per_decode=1000 * decode_seconds / max(n, 1), failures=failures)
