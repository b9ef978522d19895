"""Inter-rater agreement: Cohen's kappa (pairwise), Fleiss' kappa, Krippendorff's alpha, raw agreement.

Input is a *label table* ``labels[item][rater] = label``: labels are canonical response ids or
``"tie"`` (any hashable), never screen sides, so the side a rater saw cannot change a figure.
A rater missing from an item simply did not judge it. Every public function also accepts an
already encoded :class:`LabelMatrix` (what the bootstrap resamples).

Degenerate cases:

* expected agreement of 1 (every rating in one category, e.g. all raters always say the
  same id): Fleiss' kappa / alpha = 1.0 (observed disagreement is then 0 as well, and "no
  disagreement at all" is reported as perfect agreement); a *pair's* Cohen's kappa is
  undefined (0/0, sklearn gives NaN): ``cohen_kappa`` raises, the pairwise matrix holds NaN
  and the mean pairwise kappa leaves the pair out. With few shared items this is common
  (two raters sharing one item with equal labels) and counting it as 1.0 inflated the mean;
* two raters with no shared item, or a table with no item rated twice -> ``ValueError``
  naming the raters (there is nothing to measure); the pairwise matrix holds NaN for such a
  pair and the mean skips it.

Every statistic has a ``*_batched(m, weights)`` twin: the same formula with item ``i`` counted
``weights[b, i]`` times, for a whole batch of bootstrap resamples at once (numpy over replicates;
``weights`` = how often each item was drawn). Undefined replicates are NaN.
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
    """Cohen's kappa of two code vectors over the positions both judged (NaN if none, or p_e = 1)."""
    both = (a >= 0) & (b >= 0)
    n = int(both.sum())
    if n == 0:
        return float("nan")
    conf = np.bincount(a[both] * k + b[both], minlength=k * k).reshape(k, k) / n
    p_o = float(np.trace(conf))
    p_e = float(conf.sum(1) @ conf.sum(0))
    if p_e >= 1.0 - 1e-15:
        return float("nan")  # 0/0: both raters used one category (sklearn: nan)
    return (p_o - p_e) / (1.0 - p_e)


def cohen_kappa(labels: LabelTable | LabelMatrix, rater_a: Hashable, rater_b: Hashable) -> float:
    """Cohen's kappa of two raters over the items both judged.

    kappa = (p_o - p_e) / (1 - p_e), p_o = share of shared items with equal labels,
    p_e = sum_c p_a(c) p_b(c) from each rater's marginals on those items
    (Cohen 1960, "A coefficient of agreement for nominal scales"). p_e = 1 (both raters used
    one and the same category on their shared items) is 0/0: ``ValueError``, as sklearn's NaN.
    """
    m = encode(labels)
    for r in (rater_a, rater_b):
        if r not in m.raters:
            raise ValueError(f"cohen_kappa: unknown rater {r!r}")
    a, b = m.codes[:, m.raters.index(rater_a)], m.codes[:, m.raters.index(rater_b)]
    kappa = _cohen_codes(a, b, m.n_categories)
    if np.isnan(kappa):
        if not ((a >= 0) & (b >= 0)).any():
            raise ValueError(f"cohen_kappa: raters {rater_a!r} and {rater_b!r} share no judged item")
        raise ValueError(f"cohen_kappa: undefined for raters {rater_a!r} and {rater_b!r}: expected agreement is 1 "
                         "(both used one and the same category on their shared items)")
    return kappa


MIN_SHARED = 5  # pairs sharing fewer items stay out of the mean pairwise kappa (the per-rater table warns at 5 too)


@dataclass(frozen=True)
class MeanKappa:
    """The mean pairwise kappa and which rater pairs entered it (``PairwiseKappa.mean_detail``)."""

    value: float | None  # None: no pair qualifies (``reason`` says why)
    min_shared: int
    n_pairs: int  # pairs in the mean
    n_pairs_few_items: int  # pairs sharing 1 .. min_shared - 1 items: left out
    n_pairs_undefined: int  # pairs sharing enough items whose kappa is undefined (p_e = 1): left out
    reason: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PairwiseKappa:
    raters: tuple
    matrix: np.ndarray  # (R, R); 1 on the diagonal, NaN for pairs with no shared item
    n_shared: np.ndarray  # (R, R) items both judged

    def mean_detail(self, min_shared: int = MIN_SHARED) -> MeanKappa:
        """Mean over the rater pairs sharing at least ``min_shared`` items whose kappa is defined, each
        weighted by the items it shares: sum n_ij kappa_ij / sum n_ij. A pair sharing a handful of items
        has a kappa that is a chance accident (one shared item with equal labels: p_e = 1, undefined);
        in a many-rater, overlap-3 round most pairs are such pairs and they moved the mean and its
        bootstrap (where repeated items make more of them) apart. In a complete design (every rater on
        every item) all weights are equal and this is the plain mean."""
        if min_shared < 1:
            raise ValueError(f"mean pairwise kappa: min_shared must be >= 1, got {min_shared}")
        iu = np.triu_indices(len(self.raters), 1)
        vals, n = self.matrix[iu], self.n_shared[iu]
        enough = n >= min_shared
        keep = enough & ~np.isnan(vals)
        few, undefined = int(((n > 0) & ~enough).sum()), int((enough & np.isnan(vals)).sum())
        if keep.any():
            return MeanKappa(float(np.average(vals[keep], weights=n[keep].astype(float))), min_shared,
                             int(keep.sum()), few, undefined)
        if not (n > 0).any():
            reason = "no two raters share an item"
        else:
            reason = (f"no pair of raters shares {min_shared} or more items with a defined kappa ({few} pairs share "
                      f"fewer, {undefined} used one category only); Fleiss' kappa and Krippendorff's alpha use "
                      "every item judged twice or more")
        return MeanKappa(None, min_shared, 0, few, undefined, reason)

    @property
    def mean(self) -> float:
        """``mean_detail()``'s value; ``ValueError`` with the reason when no pair qualifies."""
        d = self.mean_detail()
        if d.value is None:
            raise ValueError(f"mean pairwise kappa: {d.reason}")
        return d.value

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


def mean_pairwise_kappa(labels: LabelTable | LabelMatrix, *, min_shared: int = MIN_SHARED) -> float:
    """Mean of Cohen's kappa over the rater pairs that share at least ``min_shared`` items and have a
    defined kappa, weighted by the items each pair shares (``PairwiseKappa.mean_detail``;
    docs/quality.md). ``ValueError`` when no pair qualifies."""
    d = pairwise_kappa(labels).mean_detail(min_shared)
    if d.value is None:
        raise ValueError(f"mean pairwise kappa: {d.reason}")
    return d.value


def mean_pairwise_kappa_batched(m: LabelMatrix, weights: np.ndarray, *, min_shared: int = MIN_SHARED) -> np.ndarray:
    """:func:`mean_pairwise_kappa` for each row of ``weights`` (B, n_items): item i counted weights[b, i]
    times, so a pair's shared items are counted with multiplicity as drawn. (B,), NaN where no pair qualifies.

    Per pair (r, s) and replicate: n = sum_i w_i J_ir J_is, p_o = sum_i w_i [x_ir = x_is] J_ir J_is / n,
    m_r(c) = sum_i w_i [x_ir = c] J_is, p_e = sum_c m_r(c) m_s(c) / n^2 -- Cohen's formula on the
    resampled table, one matrix product for all replicates.
    """
    codes, k = m.codes, m.n_categories
    judged = codes >= 0
    r_idx, s_idx = np.triu_indices(codes.shape[1], 1)
    ever = (judged[:, r_idx] & judged[:, s_idx]).any(0)  # pairs that share no item never enter
    r_idx, s_idx = r_idx[ever], s_idx[ever]
    n_pairs = len(r_idx)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if n_pairs == 0:
        return np.full(w.shape[0], np.nan)
    jr, js = judged[:, r_idx], judged[:, s_idx]  # (n, P)
    cr, cs = codes[:, r_idx], codes[:, s_idx]
    feats = [jr & js, (cr == cs) & jr & js]
    feats += [(cr == c) & js for c in range(k)] + [(cs == c) & jr for c in range(k)]
    f = np.concatenate(feats, axis=1).astype(np.float64)  # (n, (2 + 2k) P)
    out = np.empty(w.shape[0])
    step = max(1, 4_000_000 // f.shape[1])  # bound the (replicates, features) product's memory
    for lo in range(0, w.shape[0], step):
        g = (w[lo:lo + step] @ f).reshape(-1, 2 + 2 * k, n_pairs)  # (b, feature, pair)
        n, agree, mr, ms = g[:, 0], g[:, 1], g[:, 2:2 + k], g[:, 2 + k:]
        with np.errstate(divide="ignore", invalid="ignore"):
            p_o = agree / n
            p_e = (mr * ms).sum(1) / (n * n)
            kappa = (p_o - p_e) / (1.0 - p_e)
        keep = (n >= min_shared) & (p_e < 1.0 - 1e-15)
        wsum = np.where(keep, n, 0.0).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[lo:lo + step] = np.where(keep, n * kappa, 0.0).sum(1) / wsum
        out[lo:lo + step][wsum == 0] = np.nan
    return out


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


def _item_weights(weights: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(B, n_kept) the resample weights of the items a many-rater statistic keeps."""
    return np.atleast_2d(np.asarray(weights, dtype=np.float64))[:, keep]


def percent_agreement_batched(m: LabelMatrix, weights: np.ndarray) -> np.ndarray:
    """:func:`percent_agreement` per row of ``weights`` (B, n_items): sum_i w_i P_i / sum_i w_i. (B,)"""
    keep, p_i = _per_item_agreement(_counts(m))
    w = _item_weights(weights, keep)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (w @ p_i) / w.sum(1)


def fleiss_kappa_batched(m: LabelMatrix, weights: np.ndarray) -> np.ndarray:
    """:func:`fleiss_kappa` per row of ``weights`` (B, n_items), item i counted w_i times:
    P_bar = sum_i w_i P_i / sum_i w_i, p_c = sum_i w_i n_ic / sum_i w_i n_i. (B,), NaN if no item is kept."""
    counts = _counts(m)
    keep, p_i = _per_item_agreement(counts)
    w = _item_weights(weights, keep)
    c = counts[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_bar = (w @ p_i) / w.sum(1)
        nc = w @ c  # (B, k)
        p_c = nc / nc.sum(1, keepdims=True)
        p_e = (p_c * p_c).sum(1)
        out = (p_bar - p_e) / (1.0 - p_e)
    return np.where(p_e >= 1.0 - 1e-15, 1.0, out)  # NaN p_e (nothing kept) stays NaN via out


def krippendorff_alpha_batched(m: LabelMatrix, weights: np.ndarray) -> np.ndarray:
    """:func:`krippendorff_alpha` per row of ``weights`` (B, n_items), unit u counted w_u times:
    n_c = sum_u w_u n_uc, trace(o) = sum_u w_u (sum_c n_uc^2 - m_u) / (m_u - 1), n = sum_c n_c. (B,)"""
    counts = _counts(m)
    m_u = counts.sum(1)
    keep = m_u >= 2
    c, mu = counts[keep], m_u[keep]
    w = _item_weights(weights, keep)
    n_c = w @ c  # (B, k)
    n = n_c.sum(1)
    trace = w @ (((c * c).sum(1) - mu) / (mu - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        d_o = (n - trace) / n
        d_e = (n * n - (n_c * n_c).sum(1)) / (n * (n - 1))
        out = 1.0 - d_o / d_e
    out = np.where(d_e <= 1e-15, 1.0, out)
    return np.where(n > 0, out, np.nan)


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
