"""Inter-rater agreement: Cohen's kappa (pairwise), Fleiss' kappa, Krippendorff's alpha, raw agreement.

Input is a *label table* ``labels[item][rater] = label``: labels are canonical response ids or
``"tie"`` (any hashable), never screen sides, so the side a rater saw cannot change a figure.
A rater missing from an item simply did not judge it. Every public function also accepts an
already encoded :class:`LabelMatrix` (what the bootstrap resamples).

Degenerate cases have defined results instead of NaN:

* expected agreement of 1 (every rating in one category, e.g. all raters always say the
  same id) -> kappa / alpha = 1.0: observed disagreement is then 0 as well, and "no
  disagreement at all" is reported as perfect agreement;
* two raters with no shared item, or a table with no item rated twice -> ``ValueError``
  naming the raters (there is nothing to measure); the pairwise matrix holds NaN for such a
  pair and the mean skips it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LabelTable = Mapping[Hashable, Mapping[Hashable, Hashable]]


@dataclass(frozen=True)
class LabelMatrix:
    """A label table coded as integers: ``codes[i, r]`` is the category index, -1 = not judged."""

    codes: np.ndarray  # (n_items, n_raters) int
    items: tuple
    raters: tuple
    categories: tuple

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    def take(self, rows: np.ndarray) -> LabelMatrix:
        """The matrix restricted to (possibly repeated) item rows, for the bootstrap."""
        return LabelMatrix(self.codes[rows], tuple(self.items[i] for i in rows), self.raters, self.categories)


def _sort_key(x: Hashable) -> tuple[str, str]:
    return (type(x).__name__, repr(x))


def encode(labels: LabelTable | LabelMatrix, *, raters: Sequence[Hashable] | None = None) -> LabelMatrix:
    """Code a label table as a :class:`LabelMatrix` (raters and categories in sorted order)."""
    if isinstance(labels, LabelMatrix):
        if raters is None:
            return labels
        idx = [labels.raters.index(r) for r in raters]
        return LabelMatrix(labels.codes[:, idx], labels.items, tuple(raters), labels.categories)
    items = list(labels)
    if raters is None:
        raters = sorted({r for it in items for r in labels[it]}, key=_sort_key)
    cats = sorted({lab for it in items for lab in labels[it].values()}, key=_sort_key)
    rpos = {r: j for j, r in enumerate(raters)}
    cpos = {c: k for k, c in enumerate(cats)}
    codes = np.full((len(items), len(raters)), -1, dtype=np.int64)
    for i, it in enumerate(items):
        for r, lab in labels[it].items():
            if r in rpos:
                codes[i, rpos[r]] = cpos[lab]
    return LabelMatrix(codes, tuple(items), tuple(raters), tuple(cats))


# ---- two raters --------------------------------------------------------------------------------


def _cohen_codes(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Cohen's kappa of two code vectors over the positions both judged (NaN if none)."""
    both = (a >= 0) & (b >= 0)
    n = int(both.sum())
    if n == 0:
        return float("nan")
    conf = np.bincount(a[both] * k + b[both], minlength=k * k).reshape(k, k) / n
    p_o = float(np.trace(conf))
    p_e = float(conf.sum(1) @ conf.sum(0))
    if p_e >= 1.0 - 1e-15:
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


def cohen_kappa(labels: LabelTable | LabelMatrix, rater_a: Hashable, rater_b: Hashable) -> float:
    """Cohen's kappa of two raters over the items both judged.

    kappa = (p_o - p_e) / (1 - p_e), p_o = share of shared items with equal labels,
    p_e = sum_c p_a(c) p_b(c) from each rater's marginals on those items
    (Cohen 1960, "A coefficient of agreement for nominal scales"). p_e = 1 -> 1.0.
    """
    m = encode(labels)
    for r in (rater_a, rater_b):
        if r not in m.raters:
            raise ValueError(f"cohen_kappa: unknown rater {r!r}")
    a, b = m.codes[:, m.raters.index(rater_a)], m.codes[:, m.raters.index(rater_b)]
    kappa = _cohen_codes(a, b, m.n_categories)
    if np.isnan(kappa):
        raise ValueError(f"cohen_kappa: raters {rater_a!r} and {rater_b!r} share no judged item")
    return kappa


@dataclass(frozen=True)
class PairwiseKappa:
    raters: tuple
    matrix: np.ndarray  # (R, R); 1 on the diagonal, NaN for pairs with no shared item
    n_shared: np.ndarray  # (R, R) items both judged

    @property
    def mean(self) -> float:
        """Mean over rater pairs that share at least one item, each weighted by the items it shares:
        sum n_ij kappa_ij / sum n_ij. A pair that shares one item (whose kappa is 1.0 or a chance
        accident) weighs a fifteenth of a pair that shares fifteen; in a complete design (every rater
        on every item) all weights are equal and this is the plain mean."""
        iu = np.triu_indices(len(self.raters), 1)
        vals, n = self.matrix[iu], self.n_shared[iu].astype(float)
        keep = ~np.isnan(vals) & (n > 0)
        if not keep.any():
            raise ValueError("mean pairwise kappa: no two raters share an item")
        return float(np.average(vals[keep], weights=n[keep]))

    def rater_mean(self, i: int) -> float | None:
        """Rater ``i``'s kappa with each other rater, weighted by the items they share (None: shares none)."""
        vals, n = np.delete(self.matrix[i], i), np.delete(self.n_shared[i], i).astype(float)
        keep = ~np.isnan(vals) & (n > 0)
        return float(np.average(vals[keep], weights=n[keep])) if keep.any() else None


def pairwise_kappa(labels: LabelTable | LabelMatrix) -> PairwiseKappa:
    """Cohen's kappa for every pair of raters (see :func:`cohen_kappa`)."""
    m = encode(labels)
    r = len(m.raters)
    mat = np.eye(r)
    shared = np.zeros((r, r), dtype=np.int64)
    judged = m.codes >= 0
    for i in range(r):
        shared[i, i] = int(judged[:, i].sum())
        for j in range(i + 1, r):
            mat[i, j] = mat[j, i] = _cohen_codes(m.codes[:, i], m.codes[:, j], m.n_categories)
            shared[i, j] = shared[j, i] = int((judged[:, i] & judged[:, j]).sum())
    return PairwiseKappa(m.raters, mat, shared)


def mean_pairwise_kappa(labels: LabelTable | LabelMatrix) -> float:
    """Mean of Cohen's kappa over the rater pairs that share an item, weighted by the items each pair
    shares (``PairwiseKappa.mean``; docs/quality.md)."""
    return pairwise_kappa(labels).mean


# ---- many raters -------------------------------------------------------------------------------


def _counts(m: LabelMatrix) -> np.ndarray:
    """(n_items, n_categories) how many raters chose each category per item."""
    k = m.n_categories
    out = np.zeros((m.codes.shape[0], k), dtype=np.float64)
    rows, cols = np.nonzero(m.codes >= 0)
    np.add.at(out, (rows, m.codes[rows, cols]), 1.0)
    return out


def _per_item_agreement(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items with >= 2 ratings, and P_i = (sum_c n_ic^2 - n_i) / (n_i (n_i - 1)) for each."""
    n_i = counts.sum(1)
    keep = n_i >= 2
    c, n = counts[keep], n_i[keep]
    return keep, ((c * c).sum(1) - n) / (n * (n - 1))


def percent_agreement(labels: LabelTable | LabelMatrix) -> float:
    """Raw agreement: the mean over items (rated >= 2 times) of the share of agreeing rater pairs.

    For two raters this is the share of shared items with equal labels (Cohen's p_o); for many
    it is Fleiss' P-bar. No chance correction.
    """
    keep, p_i = _per_item_agreement(_counts(encode(labels)))
    if p_i.size == 0:
        raise ValueError("percent_agreement: no item was judged by two raters")
    return float(p_i.mean())


def fleiss_kappa(labels: LabelTable | LabelMatrix) -> float:
    """Fleiss' kappa (Fleiss 1971, "Measuring nominal scale agreement among many raters").

    kappa = (P_bar - P_e) / (1 - P_e), with P_i = (sum_c n_ic^2 - n_i) / (n_i (n_i - 1)),
    P_bar = mean_i P_i, p_c = sum_i n_ic / sum_i n_i, P_e = sum_c p_c^2.

    Varying numbers of raters per item: the standard form needs equal n_i; here each item's
    P_i uses its own n_i, items with fewer than two ratings are dropped (they carry no
    agreement), P_bar is the unweighted mean over items and p_c pools all ratings of the
    kept items. With equal n_i this is exactly Fleiss' formula. P_e = 1 -> 1.0.
    """
    counts = _counts(encode(labels))
    keep, p_i = _per_item_agreement(counts)
    if p_i.size == 0:
        raise ValueError("fleiss_kappa: no item was judged by two raters")
    p_c = counts[keep].sum(0) / counts[keep].sum()
    p_e = float((p_c * p_c).sum())
    p_bar = float(p_i.mean())
    if p_e >= 1.0 - 1e-15:
        return 1.0
    return (p_bar - p_e) / (1.0 - p_e)


def krippendorff_alpha(labels: LabelTable | LabelMatrix) -> float:
    """Krippendorff's alpha, nominal metric, missing data allowed (Krippendorff 2011,
    "Computing Krippendorff's alpha-reliability").

    Coincidences o_ck = sum_u (number of ordered c-k rating pairs in unit u) / (m_u - 1) over
    units with m_u >= 2 ratings; n_c = sum_k o_ck, n = sum_c n_c.
    alpha = 1 - D_o / D_e, D_o = sum_{c != k} o_ck / n, D_e = sum_{c != k} n_c n_k / (n (n - 1)).
    D_e = 0 (one category in use) -> 1.0.
    """
    counts = _counts(encode(labels))
    m_u = counts.sum(1)
    keep = m_u >= 2
    c, m = counts[keep], m_u[keep]
    if c.shape[0] == 0:
        raise ValueError("krippendorff_alpha: no item was judged by two raters")
    # ordered pairs c-k within a unit: n_uc n_uk for c != k, n_uc (n_uc - 1) for c == k
    o = (c.T / (m - 1)) @ c
    o[np.diag_indices_from(o)] -= (c / (m - 1)[:, None]).sum(0)
    n_c = o.sum(1)
    n = n_c.sum()
    d_o = (n - np.trace(o)) / n
    d_e = (n * n - (n_c * n_c).sum()) / (n * (n - 1))
    if d_e <= 1e-15:
        return 1.0
    return float(1.0 - d_o / d_e)


# ---- per rater ---------------------------------------------------------------------------------


def majority_labels(labels: LabelTable | LabelMatrix, *, exclude: Hashable | None = None) -> dict:
    """The strict plurality label per item (optionally leaving one rater out); split items are absent."""
    m = encode(labels)
    codes = m.codes
    if exclude is not None:
        codes = np.delete(codes, m.raters.index(exclude), axis=1)
    counts = _counts(LabelMatrix(codes, m.items, m.raters, m.categories))
    out = {}
    for i, row in enumerate(counts):
        if row.sum() == 0:
            continue
        top = row.max()
        if (row == top).sum() == 1:
            out[m.items[i]] = m.categories[int(row.argmax())]
    return out


@dataclass(frozen=True)
class RaterAgreement:
    rater: Hashable
    n: int  # items compared
    agreement: float | None  # share equal to the reference; None when n == 0


def agreement_with_reference(
    labels: LabelTable | LabelMatrix, reference: Mapping[Hashable, Hashable] | None = None
) -> dict[Hashable, RaterAgreement]:
    """Per rater: share of their judged items whose label equals the reference.

    ``reference`` None -> the majority of the *other* raters (leave-one-out strict plurality;
    items where the others split evenly are skipped), so a rater is never compared with
    themselves. A rater with no comparable item gets n = 0 and agreement None.
    """
    m = encode(labels)
    out = {}
    for j, r in enumerate(m.raters):
        ref = majority_labels(m, exclude=r) if reference is None else reference
        hits = total = 0
        for i, it in enumerate(m.items):
            code = m.codes[i, j]
            if code < 0 or it not in ref:
                continue
            total += 1
            hits += m.categories[code] == ref[it]
        out[r] = RaterAgreement(r, total, hits / total if total else None)
    return out
