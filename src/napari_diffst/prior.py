"""Cell-level regression prior for Diff-ST: a ridge map from cell- and tissue-level histology to expression.

Diff-ST (``diffst`` in the benchmark) denoises a residual on top of a *base* map, and the condition it sees
holds that base (``field.lr_upsampled(3)`` by default: the edge-aware cubic LR↑).  With ``prior='cell'``
the base is this module's :class:`CellRidgePrior`: the expression residual ``truth − LR↑`` regressed, per
gene, on

* the **cell-level** features of :mod:`napari_diffst.data.cellfeatures` (nucleus-level morphometrics from
  the H&E at ≈ 1.25 µm/px, averaged over the spot disk and the HR cell) of the HR pixel,
* the same features minus their mean over the pixel's LR block (how this spot differs from the others
  the LR value was measured over),
* their mean over the 3 × 3 in-tissue neighbourhood (tissue-level context),
* the LR↑ values of every gene (co-expression: the residual of one gene may follow another's level).

One linear map for all genes (multi-output ridge, features standardised on the training pixels), fitted
on the in-tissue HR pixels of the training fields.  The ridge strength is chosen from ``lams`` by
leave-one-section-out cross-validation on the *training* fields (score: mean PCC + detail-PCC over genes);
no validation or test field is used.  Everything is closed form: fitting takes well under a second.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .errors import DataFormatError
from .metrics import block_mean, detail_pcc_per_gene, pcc_per_gene

__all__ = ["CellRidgePrior", "prior_design"]


def _neighbour_mean(F: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w = mask.astype(np.float32)
    k = np.ones((3, 3), np.float32)
    den = ndi.convolve(w, k, mode="constant")
    return np.stack([ndi.convolve(a * w, k, mode="constant") for a in F]) / np.maximum(den, 1e-6)


def prior_design(field) -> np.ndarray:
    """Design matrix (F_total, H, W) of :class:`CellRidgePrior` for one field (needs
    ``field.extra['cell_features']``, see :func:`napari_diffst.data.cellfeatures.add_cell_features`)."""
    F = field.extra.get("cell_features")
    if F is None:
        raise DataFormatError(None, f"field {field.name!r} has no cell-level features",
                              "field.extra['cell_features'] from napari_diffst.data.cellfeatures.add_cell_features"
                              "(field, sample)")
    F = np.asarray(F, np.float32)
    if F.shape[1:] != tuple(field.hr_shape):
        raise DataFormatError(None, f"field {field.name!r}: cell features {F.shape} not on the HR grid "
                              f"{field.hr_shape}", "(F, H, W) on the field's HR grid")
    mask = np.asarray(field.hr_mask, bool)
    s = int(field.scale)
    bm = np.repeat(np.repeat(block_mean(F, s, mask)[0], s, axis=1), s, axis=2)
    return np.concatenate([F, F - bm, _neighbour_mean(F, mask),
                           np.asarray(field.lr_upsampled(3), np.float32)]).astype(np.float32)


class CellRidgePrior:
    """Multi-output ridge regression of ``truth − LR↑`` on :func:`prior_design` (module docstring).

    ``fit(train_fields)`` → self; ``predict(field)`` → (G, H, W) float32 = LR↑ + residual (unmasked).
    Attributes after fit: ``lam_`` (chosen strength), ``cv_`` ({lam: (pcc, detail_pcc)} leave-one-section-out
    on the training fields; empty with one training field, when ``lams[len // 2]`` is used)."""

    name = "cell_ridge"

    def __init__(self, lams=(0.1, 0.3, 1.0, 3.0)):
        self.lams = tuple(float(x) for x in lams)
        self.coef_ = None

    @staticmethod
    def _xy(field, X):
        """In-tissue rows of the design ``X`` and of the target ``truth − LR↑``."""
        m = np.asarray(field.hr_mask, bool)
        up = np.asarray(field.lr_upsampled(3), np.float32)
        return X[:, m].T.astype(np.float64), (np.asarray(field.hr, np.float32) - up)[:, m].T.astype(np.float64)

    #: standardised inputs are clipped to ± this many training SDs at fit and predict time, and a feature whose
    #: training SD is below 1e-6 of its scale is treated as constant (its coefficient is 0): a feature nearly
    #: constant on a small training field would otherwise be divided by ~0 and extrapolate without bound on
    #: another field (the 10⁷–10¹¹ Diff-ST losses on the MERSCOPE region came from such a prior)
    Z_CLIP = 6.0

    @staticmethod
    def _solve(X, Y, lam):
        mu, sd = X.mean(0), X.std(0)
        const = sd <= 1e-6 * np.maximum(np.abs(X).max(0), 1e-2)
        sd[const] = np.inf  # standardised value 0: no coefficient, no extrapolation
        Xn = np.clip((X - mu) / sd, -CellRidgePrior.Z_CLIP, CellRidgePrior.Z_CLIP)
        ym = Y.mean(0)
        A = Xn.T @ Xn + lam * len(Xn) * np.eye(X.shape[1])
        B = np.linalg.solve(A, Xn.T @ (Y - ym))
        return mu, sd, B, ym

    @staticmethod
    def _apply(params, field, X=None):
        mu, sd, B, ym = params
        X = prior_design(field) if X is None else X
        F, H, W = X.shape
        R = np.clip((X.reshape(F, -1).T - mu) / sd, -CellRidgePrior.Z_CLIP, CellRidgePrior.Z_CLIP) @ B + ym
        return (np.asarray(field.lr_upsampled(3), np.float32) + R.T.reshape(-1, H, W)).astype(np.float32)

    def fit(self, train_fields, val_field=None, seed: int = 0, budget=None):
        fields = [f for f in train_fields if getattr(f, "hr", None) is not None]
        if not fields:
            raise DataFormatError(None, "the cell-level prior needs training fields with HR truth",
                                  "degrade or truth fields")
        self.genes_ = list(fields[0].genes)
        designs = [prior_design(f) for f in fields]
        data = [self._xy(f, X) for f, X in zip(fields, designs)]
        self.cv_ = {}
        if len(fields) > 1 and len(self.lams) > 1:
            for lam in self.lams:
                sc = []
                for i, f in enumerate(fields):
                    X = np.concatenate([d[0] for j, d in enumerate(data) if j != i])
                    Y = np.concatenate([d[1] for j, d in enumerate(data) if j != i])
                    p = self._apply(self._solve(X, Y, lam), f, designs[i])
                    m = np.asarray(f.hr_mask, bool)
                    sc.append((np.nanmean(pcc_per_gene(p, f.hr, m)),
                               np.nanmean(detail_pcc_per_gene(p, f.hr, f.lr_upsampled(0), m))))
                self.cv_[lam] = tuple(float(v) for v in np.mean(sc, axis=0))
            self.lam_ = max(self.cv_, key=lambda k: sum(self.cv_[k]))
        else:
            self.lam_ = self.lams[len(self.lams) // 2]
        X = np.concatenate([d[0] for d in data])
        Y = np.concatenate([d[1] for d in data])
        self.coef_ = self._solve(X, Y, self.lam_)
        return self

    def predict(self, field) -> np.ndarray:
        if self.coef_ is None:
            raise RuntimeError("cell_ridge: call fit() before predict()")
        if list(field.genes) != self.genes_:
            raise DataFormatError(None, f"field {field.name!r} has genes {list(field.genes)[:5]}… but the prior was "
                                  f"fitted on {self.genes_[:5]}…", "the same gene panel in the same order")
        return self._apply(self.coef_, field)
