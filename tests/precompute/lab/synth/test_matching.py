"""Hungarian matching of learned to true directions."""

from __future__ import annotations

import numpy as np
import pytest

from precompute.lab.synth.matching import match_dictionary


# ------------------------------------------------------------------------------ matching
def test_hungarian_matching_recovers_a_signed_permutation() -> None:
    rng = np.random.default_rng(0)
    true = rng.standard_normal((40, 24))
    perm = rng.permutation(40)
    signs = rng.choice([-1.0, 1.0], size=40)
    learned = (true * 3.0)[perm] * signs[:, None]  # learned row i = sign_i * true[perm[i]] (unnormalised)
    m = match_dictionary(true, learned)
    inverse = np.argsort(perm)
    np.testing.assert_array_equal(m.assignment, inverse)
    np.testing.assert_array_equal(m.learned_to_true, perm)
    assert m.mcc == pytest.approx(1.0, abs=1e-12) and m.mmcs == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(m.matched_cos, signs[inverse], atol=1e-12)
    # extra learned rows (random) change nothing; fewer learned rows leave true rows unmatched
    extra = np.vstack([learned, rng.standard_normal((20, 24))])
    m2 = match_dictionary(true, extra)
    np.testing.assert_array_equal(m2.assignment, inverse)
    assert m2.mcc == pytest.approx(1.0) and (m2.learned_to_true[40:] == -1).all()
    m3 = match_dictionary(true, learned[:30])
    assert (m3.assignment == -1).sum() == 10 and m3.mcc == pytest.approx(0.75)
