"""Analytic ("designed") weight rows that make the stand-in UNet behave like a trained generator.

Used by ``models.build_model(..., weights=Weights.FACE)``. The network keeps its topology;
some output channels of some convolutions get hand-made weights instead of random,
BatchNorm-calibrated ones. Those *designed channels* carry named signals (labels) through
the graph, block-structured: a designed row reads only designed channels of its input,
while random rows read every channel (the designed ones are just more image/audio to them).

Signals (all non-negative wherever a ReLU follows, so every ReLU on their path is the identity):

- ``p0 p1 p2``: the ROI's B, G, R (visual channels 0-2) times ``ROI_SCALE``, from ``inc``
  through the ``x1`` skip into ``up5``; the encoder (``down*``) does not carry them.
- ``a+ a-``: the positive and negative parts of the audio's temporal change (mean of the
  later 8 feature rows minus the earlier 8, at each of the 16x16 feature positions) times
  ``AUDIO_SCALE``, from ``audio.0`` through the audio branch, ``fuse`` and ``up1..up4``, blurred
  by every designed depthwise conv. Zero-mean for stationary features, so a fixed feature
  level does not tint the face; zero padding reads as "no change".
- ``m``: the *mouth mask*, ``MASK_LEVEL`` inside a rectangle of the ROI around the mouth and 0
  in a band along its border (``MASK_GRID``). A constant (a bias) from ``audio.0``, shaped only
  by zero padding: ``audio.4`` (stride 2, pad 3) zeroes the outer ring of the 10x10 grid, and
  the depthwise convs of ``fuse.0.0`` and ``fuse.1.0`` blur it and cut it at
  ``MASK_CUT``, which erodes it a cell at a time (``_MASK_KERNELS``); ``up1..up4`` upsample it
  bilinearly (the last two also blur it), so it ramps smoothly over about a cell (35 px).
- ``l0 ..``: logits made by ``up5.0``: a piecewise-linear fit of ``logit(p)`` (ReLU hinges),
  plus the audio term and a random projection of up5's random input channels (``RANDOM_GAIN``:
  how the rest of the network reaches the output), both clipped to ``+-clip * mask``: outside
  the mouth mask the ROI passes through untouched, so a pasted box does not show (no tint, no
  seam), and inside it the audio changes the mouth. ``outc`` maps them to the 3 output logits.
  With 3 designed ``up5`` outputs (FULL) each colour has its own logit, fitted closely enough
  (``FULL_KNOTS``) that every level 0-254 comes back exactly; with 2 (SMALL: ``up5`` has 2
  output channels, and 16 hidden ones leave room for 9 hinges only) they are the luma logit and
  a red-minus-blue chroma term, so SMALL loses most colour differences that are not along
  red-blue and its luma is within ~6 levels: SMALL is for speed, FULL for pictures.

Everything else stays random and BatchNorm-calibrated (its output std is ``RANDOM_STD``, so
tensors that mix both kinds keep INT8 resolution for the designed signals). The designed
signals pass ~15 INT8 rounding points without amplification, unlike the random network,
which is chaotic; that is why ``RANDOM_GAIN`` stays small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Rows = dict[int, tuple[np.ndarray, float]]  # output channel -> (weight [Cin/g, k, k], bias)
Sig = dict[str, int]  # signal label -> channel index of a tensor

ROI_SCALE = 8.0  # the ROI in [0, 1] travels as [0, 8]: above the random channels' spread
AUDIO_SCALE = 24.0  # the audio change (std ~0.2 per position on rectified-noise features)
# The audio term is AUDIO_GAIN * clip(a+ - a-, -AUDIO_CLIP, AUDIO_CLIP) logits: ~0.5 std of
# a+ - a- at up5 on rectified-noise features, while the stand-in encoder's features (2.5x that
# scale, and speech changes over the window) mostly saturate it: at most 0.25 logit either way.
AUDIO_GAIN = 0.25
AUDIO_CLIP = 1.0
MASK_LEVEL = 4.0  # the mask travels as [0, 4]: INT8 resolves it to ~1 %
# A depthwise row that cuts at MASK_CUT: ReLU((v - MASK_CUT * L) / (1 - MASK_CUT)) keeps L where
# the blurred mask is whole and drops a cell that sees a zero neighbour (its blur <= 0.75 L).
MASK_CUT = 0.8
# The mask's plateau on the 10x10 grid of fuse (rows, columns; cell i is at i / 9 of the ROI):
# rows 2-5 and columns 3-6 (22-56 % down, 33-67 % across: the mouth of a lower-face crop, which
# runs from the nose to below the chin), ramping to 0 at rows 1 and 6 (11 %, 67 %) and columns
# 2 and 7 (22 %, 78 %).
MASK_GRID = ((2, 5), (3, 6))
# Output std of the random (BatchNorm-calibrated) rows: small next to the designed signals,
# whose INT8 resolution is set by the range of the tensors they share with random channels.
RANDOM_STD = 0.25
# Logit std (on calibration data) that the random hidden channels of up5.0 add: the random
# network is chaotic, its INT8 error is about its own size, so this stays small.
RANDOM_GAIN = 0.05
RANDOM_CLIP = 2.0  # in std units of the random projection
CHROMA_SLOPE = 5.0  # SMALL: d logit / d p around mid grey, for the chroma term
_BLUR = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
# Mask kernels (see ``m`` above) and whether the row cuts at MASK_CUT. At 16x16, audio.0 and
# audio.1 move the constant up a row each (rows 0-13 of 16), so audio.4 (stride 2, pad 3: cell i
# reads row 2i - 2) leaves rows 1-7 and columns 1-8 of the 10x10 grid; fuse.0.0 erodes a ring
# (rows 2-6, columns 2-7); fuse.1.0 reads its own row and the one below, blurred across, which
# erodes the bottom row and a column on each side: rows 2-5, columns 3-6 (MASK_GRID).
_SHIFT_UP = np.outer([0.0, 0.0, 1.0], [0.0, 1.0, 0.0])  # out(y, x) = in(y + 1, x)
_MASK_KERNELS = {
    "audio.0": (_SHIFT_UP, False),
    "audio.1": (_SHIFT_UP, False),
    "fuse.0.0": (_BLUR, True),
    "fuse.1.0": (np.outer([0.0, 1.0, 1.0], [1.0, 2.0, 1.0]) / 8.0, True),
}
# Blurred at 80 and 160 px only, to round off the bilinear ramps: a blur at 20 and 40 px too
# would spread the mask ~25 px further out, towards the border that must stay untouched.
_MASK_BLURRED = ("up3.0", "up4.0")
# Hinges of the logit fit: (direction, knot); direction +1 is ReLU(u - t), -1 is ReLU(t - u).
_HINGES = [(1, 0.0), (1, 0.85), (1, 0.93), (1, 0.97), (1, 0.99)] + [
    (-1, t) for t in (0.15, 0.07, 0.03, 0.01)
]
# FULL has hidden channels for many more: 16 knots put every level 0-254 within 0.46 of the
# middle of its truncation interval (so it comes back exactly), 20 within 0.31 (margin for
# FP16 and the graph's rounding).
FULL_KNOTS = 20


def _dense_hinges(n: int) -> list[tuple[int, float]]:
    """``n`` knots spaced for a uniform output error: knot density ~ sqrt(|logit''| / tolerance),
    the tolerance being half a level in logit units, ``0.5 / (255 u (1 - u))``; so
    ``sqrt(|2u - 1| * 510 / (u (1 - u)))``, plus a floor so the middle is not empty. Knots below
    0.5 open to the left (ReLU(t - u)), the others to the right, after a linear term."""
    u = np.linspace(1e-4, 1.0 - 1e-4, 20001)
    density = np.sqrt(np.abs(2.0 * u - 1.0) * 510.0 / (u * (1.0 - u))) + 2.0
    cdf = np.cumsum(density)
    knots = np.interp((np.arange(n) + 0.5) / n, cdf / cdf[-1], u)
    return [(1, 0.0)] + [(1, float(t)) if t >= 0.5 else (-1, float(t)) for t in knots]


@dataclass(frozen=True)
class Design:
    """Designed rows of one conv and the labels of its output tensor."""

    rows: Rows
    sig: Sig


@dataclass(frozen=True)
class IRDesign:
    expand: Design
    dw: Design
    project: Design


def _row(cin: int, kernel: int, taps: dict[int, np.ndarray | float], bias: float = 0.0):
    """A weight row [cin, k, k] reading channel c with kernel ``taps[c]`` (a scalar: centre tap)."""
    w = np.zeros((cin, kernel, kernel), np.float32)
    for c, tap in taps.items():
        if np.ndim(tap) == 0:
            w[c, kernel // 2, kernel // 2] = tap
        else:
            w[c] = tap
    return w, float(bias)


def _dw_row(name: str, label: str) -> tuple[np.ndarray, float]:
    """Depthwise row of a carried signal: audio is smoothed, image and logits are not, and the
    mask is shaped (``_MASK_KERNELS``: blurred, then cut at ``MASK_CUT``) or carried."""
    if label == "m":
        if name in _MASK_KERNELS:
            kernel, cut = _MASK_KERNELS[name]
            if not cut:
                return _row(1, 3, {0: kernel})
            gain = 1.0 / (1.0 - MASK_CUT)
            return _row(1, 3, {0: kernel * gain}, -MASK_CUT * MASK_LEVEL * gain)
        return _row(1, 3, {0: _BLUR if name in _MASK_BLURRED else 1.0})
    return _row(1, 3, {0: _BLUR if label.startswith("a") else 1.0})


def _fit_logit(hinges: list[tuple[int, float]]) -> tuple[float, np.ndarray]:
    """Least squares ``logit(q) ~ c0 + sum_j coef_j * ReLU(d_j (u - t_j))`` on u in [0, 1].

    q = u + 0.5/255 (the compositor truncates ``output * 255``), weighted by q(1-q) so the fit
    is good in output space.
    """
    u = np.linspace(0.0, 1.0, 2049)
    q = np.clip(u + 0.5 / 255, 0.5 / 255, 1 - 0.5 / 255)
    target = np.log(q / (1 - q))
    feats = np.stack([np.ones_like(u)] + [np.maximum(d * (u - t), 0.0) for d, t in hinges], 1)
    wt = (q * (1 - q))[:, None]
    coef = np.linalg.lstsq(feats * wt, target * wt[:, 0], rcond=None)[0]
    return float(coef[0]), coef[1:]


class FacePlan:
    """Designed rows for each conv of the UNet, by layer name (see the module docstring)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, 0xFACE])

    def ir(self, name: str, sig: Sig, cin: int, hidden: int, cout: int, res: bool):
        """The three designed parts of an inverted residual block, or None (all random)."""
        if name == "inc":
            rows = {c: _row(cin, 1, {c: ROI_SCALE}) for c in range(3)}
            return self._chain(name, rows, ["p0", "p1", "p2"], hidden)
        if name == "audio.0":
            half = cin // 2  # channels 0-15: feature rows 0-7, 16-31: rows 8-15 (2 per row)
            change = np.r_[-np.ones(half), np.ones(cin - half)] * AUDIO_SCALE / half
            rows = {
                j: _row(cin, 1, {c: s * change[c] for c in range(cin)})
                for j, s in enumerate((1.0, -1.0))
            }
            rows[2] = _row(cin, 1, {}, MASK_LEVEL)  # the mask starts as a constant
            return self._chain(name, rows, ["a+", "a-", "m"], hidden)
        if name.startswith("down") or not sig:
            return None
        if name == "up5.0":
            return self._logits(sig, cin, hidden, cout)
        if res:  # carried by the residual connection: the designed project rows add zero
            project = {i: _row(hidden, 1, {}) for i in sig.values()}
            return IRDesign(Design({}, {}), Design({}, {}), Design(project, dict(sig)))
        labels = list(sig)
        rows = {j: _row(cin, 1, {sig[lab]: 1.0}) for j, lab in enumerate(labels)}
        return self._chain(name, rows, labels, hidden)

    def _chain(self, name: str, expand: Rows, labels: list[str], hidden: int) -> IRDesign:
        """Expand rows ``0..n-1`` (given), identity-like depthwise rows, project to ``0..n-1``."""
        dw = {j: _dw_row(name, lab) for j, lab in enumerate(labels)}
        project = {j: _row(hidden, 1, {j: 1.0}) for j in range(len(labels))}
        hidden_sig = {lab: j for j, lab in enumerate(labels)}
        return IRDesign(
            Design(expand, hidden_sig), Design(dw, hidden_sig), Design(project, hidden_sig)
        )

    def conv(self, name: str, sig: Sig, cin: int, kernel: int) -> Design | None:
        """A plain conv of the audio branch: designed signals are blurred (the mask is not: its
        shape comes from the padding alone), kept in order."""
        if not sig:
            return None
        labels = list(sig)
        blur = _BLUR if kernel == 3 else 1.0
        rows = {
            k: _row(cin, kernel, {sig[lab]: 1.0 if lab == "m" else blur})
            for k, lab in enumerate(labels)
        }
        return Design(rows, {lab: k for k, lab in enumerate(labels)})

    def _logits(self, sig: Sig, cin: int, hidden: int, cout: int) -> IRDesign:
        """up5.0: hinge features of the ROI (and the audio copies) -> K designed logits."""
        k_out = min(3, cout)
        hinges = _dense_hinges(FULL_KNOTS) if k_out == 3 else _HINGES
        const, coefs = _fit_logit(hinges)
        p = [sig[f"p{c}"] for c in range(3)]
        if k_out == 3:
            bases = [({p[c]: 1.0},) for c in range(3)]
        else:  # luma, then the chroma (R - B) / 2 as two non-negative halves
            luma = {c: 1.0 / 3.0 for c in p}
            chroma = {p[2]: 0.5, p[0]: -0.5}
            bases = [(luma,), (chroma, {c: -w for c, w in chroma.items()})]
        expand: Rows = {}
        project_terms: list[dict[int, float]] = [{} for _ in range(k_out)]
        biases = [0.0] * k_out
        j = 0
        for k, basis in enumerate(bases):
            if k_out == 3 or k == 0:  # a logit fit of this basis value
                biases[k] = const
                for (d, t), coef in zip(hinges, coefs, strict=True):
                    # Each hinge spans [0, ROI_SCALE] in the hidden tensor and its project
                    # weight is its logit span / ROI_SCALE: the weights of a row stay within
                    # ~13x (SMALL) or ~30x (FULL) of each other, so one INT8 scale per row
                    # resolves them all.
                    span = 1.0 - t if d > 0 else t
                    taps = {c: d * w / span for c, w in basis[0].items()}
                    expand[j] = _row(cin, 1, taps, -d * ROI_SCALE * t / span)
                    project_terms[k][j] = coef * span / ROI_SCALE
                    j += 1
            else:  # the signed chroma: ReLU(u) - ReLU(-u)
                for half, s in zip(basis, (1.0, -1.0), strict=True):
                    expand[j] = _row(cin, 1, half)
                    project_terms[k][j] = s * CHROMA_SLOPE / ROI_SCALE
                    j += 1
        # Audio and random terms are clipped to the mouth mask b = clip * m / MASK_LEVEL:
        # g * clip(z, -b, b) = g * (ReLU(z + b) - ReLU(z - b) - b). Features far from the
        # calibration's scale (a real encoder's) shift the mouth by a bounded amount instead of
        # saturating it, and where the mask is 0 (the ROI's border) both terms are exactly 0.
        mask = j
        expand[mask] = _row(cin, 1, {sig["m"]: 1.0})  # the mask itself, for the "- b" terms
        j += 1
        designed = set(sig.values())
        others = [c for c in range(cin) if c not in designed]  # random, std RANDOM_STD
        audio = {sig["a+"]: 1.0, sig["a-"]: -1.0}
        terms = [(audio, AUDIO_CLIP, AUDIO_GAIN, range(k_out if k_out == 3 else 1))]
        for k in range(k_out if k_out == 3 else 1):  # z ~ N(0, 1) on calibration data
            w = self.rng.standard_normal(len(others)) / (RANDOM_STD * np.sqrt(len(others)))
            terms.append((dict(zip(others, w, strict=True)), RANDOM_CLIP, RANDOM_GAIN, [k]))
        for taps, clip, gain, targets in terms:
            bound = clip / MASK_LEVEL
            expand[j] = _row(cin, 1, {**taps, sig["m"]: bound})
            expand[j + 1] = _row(cin, 1, {**taps, sig["m"]: -bound})
            for k in targets:
                project_terms[k].update({j: gain, j + 1: -gain})
                project_terms[k][mask] = project_terms[k].get(mask, 0.0) - gain * bound
            j += 2
        if j > hidden:
            raise ValueError(f"up5 needs {j} designed hidden channels, has {hidden}")
        dw = {i: _row(1, 3, {0: 1.0}) for i in range(j)}
        project = {k: _row(hidden, 1, t, biases[k]) for k, t in enumerate(project_terms)}
        labels = {f"l{k}": k for k in range(k_out)}
        return IRDesign(Design(expand, {}), Design(dw, {}), Design(project, labels))

    def outc(self, sig: Sig, cin: int, cout: int) -> Design:
        """The output conv: designed logits to B, G, R (the luma and chroma pair: B = l0 - l1,
        G = l0, R = l0 + l1); the random channels of up5 are not read."""
        logits = [sig[f"l{k}"] for k in range(len(sig))]
        rows = {}
        for c in range(cout):
            taps = {logits[c]: 1.0} if len(logits) == 3 else {logits[0]: 1.0, logits[1]: c - 1.0}
            rows[c] = _row(cin, 1, taps)
        return Design(rows, {})
