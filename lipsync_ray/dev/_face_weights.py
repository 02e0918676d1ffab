"""Analytic ("designed") weight rows that make the stand-in models behave like a trained pair.

Used by ``models.build_model(..., weights=Weights.FACE)``, for the UNet and the audio encoder.
The networks keep their topology; some output channels of some convolutions get hand-made
weights instead of random, BatchNorm-calibrated ones. Those *designed channels* carry named
signals (labels) through the graph, block-structured: a designed row reads only designed
channels of its input, while random rows read every channel (the designed ones are just more
image/audio to them). What a viewer checks: the mouth opens with the speech's loudness and
nothing else changes.

The audio encoder (``FacePlan.encoder``) measures the loudness of the output frame's own 40 ms
(see ``LOUDNESS_KNOTS``) in channel 0 of every conv and writes it, times the opening's profile
(``OPEN_ROWS``, ``OPEN_COLS``), into the 64 features that the UNet's audio branch keeps (the
even positions of the first half of a feature row, once reshaped to 16x16); its other features
stay random. Digital silence gives exactly 0 there.

UNet signals (all non-negative wherever a ReLU follows, so every ReLU on their path is the
identity):

- ``p0 p1 p2``: the ROI's B, G, R (visual channels 0-2) times ``ROI_SCALE``, from ``inc``
  through the ``x1`` skip into ``up5``; the encoder (``down*``) does not carry them.
- ``o``: the *opening*: the frame's own feature row (row 8 of the window) at the opening's
  features, times ``OPEN_GAIN``, from ``audio.0`` through the audio branch (centre taps only,
  so the random odd positions never mix in; ``audio.4``'s stride 2 drops them), ``fuse`` and
  ``up1..up4``, upsampled bilinearly: loudness times the profile, smooth over the ROI.
- ``m``: the *mouth mask*, ``MASK_LEVEL`` inside a rectangle of the ROI around the mouth and 0
  in a band along its border (``MASK_GRID``). A constant (a bias) from ``audio.0``, shaped only
  by zero padding: ``audio.4`` (stride 2, pad 3) zeroes the outer ring of the 10x10 grid, and
  the depthwise convs of ``fuse.0.0`` and ``fuse.1.0`` blur it and cut it at
  ``MASK_CUT``, which erodes it a cell at a time (``_MASK_KERNELS``); ``up1..up4`` upsample it
  bilinearly (the last two also blur it), so it ramps smoothly over about a cell (35 px). It
  keeps any features (another encoder's) from opening anything near the ROI's border.
- ``l0 ..``: logits made by ``up5.0``: a piecewise-linear fit of ``logit(p)`` (ReLU hinges),
  minus ``OPEN_DARKEN`` times the opening D = clip(``OPEN_SLOPE`` (o - ``OPEN_THRESHOLD``), 0,
  1), which is exactly 0 wherever the loudness is below the threshold and where the mask is 0:
  there the ROI passes through untouched, so a pasted box does not show (no tint, no seam) and
  a silent frame keeps the avatar's closed mouth. ``outc`` maps them to the 3 output logits.
  With 3 designed ``up5`` outputs (FULL) each colour has its own logit, fitted closely enough
  (``FULL_KNOTS``) that every level 0-254 comes back exactly; with 2 (SMALL: ``up5`` has 2
  output channels, and 16 hidden ones leave room for 9 hinges only) they are the luma logit and
  a red-minus-blue chroma term, so SMALL loses most colour differences that are not along
  red-blue and its luma is within ~6 levels: SMALL is for speed, FULL for pictures.

Everything else stays random and BatchNorm-calibrated (the UNet's output std is
``RANDOM_STD``, so tensors that mix both kinds keep INT8 resolution for the designed signals);
the random network does not reach the UNet's output. INT8 keeps the face (its rounding moves
the pass-through by a few levels: 38-42 dB in silence), but not the opened mouth: D's edge is
steep, so the rounding of ``o`` moves it by whole pixels, and the quality gate (35 dB) refuses
the model once the mouth opens (20-26 dB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bumped when the designed weights change, so a demo rebuilds the models it keeps.
DESIGN_VERSION = 2
Rows = dict[int, tuple[np.ndarray, float]]  # output channel -> (weight [Cin/g, k, k], bias)
Sig = dict[str, int]  # signal label -> channel index of a tensor

ROI_SCALE = 8.0  # the ROI in [0, 1] travels as [0, 8]: above the random channels' spread
# The mouth opening (signal ``o``). The encoder measures the loudness L of the output frame's
# own 40 ms (mel frames 2-7 of its window, all bands): each mel value v in [-4, 4] (silence -4)
# is mapped to e = v / 8 + 0.5 (1 per 100 dB), then to the convex sum of hinges
# sum_k LOUDNESS_SLOPES[k] * ReLU(e - LOUDNESS_KNOTS[k]), which grows roughly like the
# amplitude (10 ** (5 e)), and averaged: 0 in silence and quiet noise (e < 0.2, below -80 dB),
# up to ~0.5 in the demo's speech. It reaches some features as OPEN_FEATURE * L * profile; the
# generator reads the current frame's row (o = OPEN_GAIN * that) and opens the mouth where o
# exceeds OPEN_THRESHOLD (L > 0.03), further down, up and sideways the louder the frame.
LOUDNESS_KNOTS = (0.2, 0.35, 0.5)
LOUDNESS_SLOPES = (1.0, 2.0, 4.0)
FEATURE_ROWS = 16  # feature rows per generator window; row 8 is the frame's own
OPEN_FEATURE = 10.0
OPEN_GAIN = 1.0
OPEN_THRESHOLD = 0.3
OPEN_SLOPE = 6.0  # D rises from 0 to 1 over 1 / OPEN_SLOPE of o: a 2-10 px edge
# How far the mask pulls D below 0 where it is 0: more than OPEN_SLOPE * o of any features
# (o < MASK_MARGIN / OPEN_SLOPE = 16), so no audio opens anything outside the mask.
MASK_MARGIN = 100.0
OPEN_DARKEN = (5.0, 5.0, 3.0)  # logits pulled down inside the opening (B, G, R): dark red
OPEN_DARKEN_SMALL = (4.5, -1.5)  # SMALL: luma down, red-minus-blue up
# The opening's profile on the 10x10 grid of fuse (cell i at i * 319 / 9 px of the ROI): the
# product of a row and a column profile, bilinearly upsampled by the decoder. The mouth line
# is grid row 3 (ROI row 106; the drawn avatar's mouth, dev/synthetic.py); the opening reaches
# at most a cell (35 px) above and below it, and sideways from the middle columns 4-5 (142-177
# px) towards columns 2 and 7 (71-248 px), where the profile falls to 0.
OPEN_ROWS = {3: 1.0}
OPEN_COLS = {3: 0.25, 4: 1.0, 5: 1.0, 6: 0.25}
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


_CELL_PX = 319.0 / 9.0  # grid cell pitch of fuse's 10x10 in ROI pixels (align_corners)
# The ROI rectangle the opening can cover (x1, y1, x2, y2, ROI pixels): the cells around the
# profile's, where it falls to 0, and 4 px for the blurs at 80 and 160 px (_MASK_BLURRED).
_BLUR_PX = 4.0
OPEN_RECT_ROI_XYXY = (
    (min(OPEN_COLS) - 1) * _CELL_PX - _BLUR_PX,
    (min(OPEN_ROWS) - 1) * _CELL_PX - _BLUR_PX,
    (max(OPEN_COLS) + 1) * _CELL_PX + _BLUR_PX,
    (max(OPEN_ROWS) + 1) * _CELL_PX + _BLUR_PX,
)
# Every cell that audio.4 takes from the audio window (rows and columns 1-8 of the 10x10 grid):
# the opening's profile, 0 off it.
OPEN_ROWS_ALL = {i: OPEN_ROWS.get(i, 0.0) for i in range(1, 9)}
OPEN_COLS_ALL = {k: OPEN_COLS.get(k, 0.0) for k in range(1, 9)}
_THIRD = np.full(3, 1.0 / 3.0)
# The encoder's loudness (channel 0 of each conv; enc.0 makes the hinges in channels 0-2 and
# enc.1 sums them into channel 0), per strided conv: taps over (mel band, mel frame) and the
# bias. They average 3 bands at a time (80 -> 27 -> 9 -> 3 -> 1: every band, and one zero of
# padding per level, read once) and pick mel frames 2-7 of the 16: enc.6 averages frames
# (2, 3, 4) into column 1 and (5, 6, 7) into column 2, enc.9 averages those two into its column
# 1, enc.11 reads that column. Frames 2-7 (25-88 ms after the window's start) are the output
# frame's own 40 ms: feature row n is the window that starts 40 (n - 1) ms in
# (audio.compute_features), and output frame n shows 40 n to 40 n + 40 ms.
_ENCODER_TAPS: dict[int, tuple[np.ndarray, float]] = {
    3: (np.outer(_THIRD, [0.0, 1.0, 0.0]), 0.0),
    6: (np.outer(_THIRD, _THIRD), 0.0),
    9: (np.outer(_THIRD, [0.5, 0.5, 0.0]), 0.0),
    11: (np.outer(_THIRD, [0.0, 1.0, 0.0]), 0.0),
}


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
    """Depthwise row of a carried signal: image and logits pass unchanged, the mask is shaped
    (``_MASK_KERNELS``: blurred, then cut at ``MASK_CUT``) or carried, and the opening is
    carried (its odd positions must not leak into the even ones before ``audio.4``), both
    blurred at ``_MASK_BLURRED``."""
    if label == "m" and name in _MASK_KERNELS:
        kernel, cut = _MASK_KERNELS[name]
        if not cut:
            return _row(1, 3, {0: kernel})
        gain = 1.0 / (1.0 - MASK_CUT)
        return _row(1, 3, {0: kernel * gain}, -MASK_CUT * MASK_LEVEL * gain)
    blurred = label in ("m", "o") and name in _MASK_BLURRED
    return _row(1, 3, {0: _BLUR if blurred else 1.0})


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
    """Designed rows for each conv of the UNet (by layer name) and of the audio encoder (by
    index), see the module docstring."""

    def ir(self, name: str, sig: Sig, cin: int, hidden: int, cout: int, res: bool):
        """The three designed parts of an inverted residual block, or None (all random)."""
        if name == "inc":
            rows = {c: _row(cin, 1, {c: ROI_SCALE}) for c in range(3)}
            return self._chain(name, rows, ["p0", "p1", "p2"], hidden)
        if name == "audio.0":
            # The current frame's feature row (row 8 of the window; 2 channels per row): the
            # encoder's opening features (``encoder``) sit at its even positions.
            rows = {0: _row(cin, 1, {2 * (FEATURE_ROWS // 2): OPEN_GAIN})}
            rows[1] = _row(cin, 1, {}, MASK_LEVEL)  # the mask starts as a constant
            return self._chain(name, rows, ["o", "m"], hidden)
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
        """A plain conv of the audio branch: designed signals are carried by the centre tap
        (the mask's shape comes from the padding alone; the opening's odd positions hold the
        encoder's other features, which the stride-2 ``audio.4`` drops), kept in order."""
        if not sig:
            return None
        labels = list(sig)
        rows = {k: _row(cin, kernel, {sig[lab]: 1.0}) for k, lab in enumerate(labels)}
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
        # The opening D = clip(OPEN_SLOPE * (o - OPEN_THRESHOLD) - MASK_MARGIN * (1 - m / L), 0, 1)
        # = ReLU(z) - ReLU(z - 1): exactly 0 below the threshold (silence, the closed mouth) and
        # wherever the mask is 0 (the ROI's border, whatever the features), 1 in the open
        # mouth. It pulls the logits down by OPEN_DARKEN: the mouth's inside, dark and reddish.
        o_taps = {sig["o"]: OPEN_SLOPE, sig["m"]: MASK_MARGIN / MASK_LEVEL}
        o_bias = -OPEN_SLOPE * OPEN_THRESHOLD - MASK_MARGIN
        expand[j] = _row(cin, 1, o_taps, o_bias)
        expand[j + 1] = _row(cin, 1, o_taps, o_bias - 1.0)
        darken = OPEN_DARKEN if k_out == 3 else OPEN_DARKEN_SMALL
        for k, d in enumerate(darken):
            project_terms[k].update({j: -d, j + 1: d})
        j += 2
        if j > hidden:
            raise ValueError(f"up5 needs {j} designed hidden channels, has {hidden}")
        dw = {i: _row(1, 3, {0: 1.0}) for i in range(j)}
        project = {k: _row(hidden, 1, t, biases[k]) for k, t in enumerate(project_terms)}
        labels = {f"l{k}": k for k in range(k_out)}
        return IRDesign(Design(expand, {}), Design(dw, {}), Design(project, labels))

    def encoder(self, index: int, cin: int, cout: int, residual: bool) -> Design | None:
        """Conv ``enc.<index>`` of the audio encoder: channel 0 carries the loudness (see
        ``_ENCODER_TAPS``), and the last conv spreads it over the opening's features."""
        if index == 0:  # the hinges of each mel value's loudness
            rows = {k: _row(cin, 3, {0: 1.0 / 8.0}, 0.5 - t) for k, t in enumerate(LOUDNESS_KNOTS)}
            return Design(rows, {})
        if index == 1:  # residual: adds the other hinges, with their slopes, to hinge 0
            taps = {k: slope - (k == 0) for k, slope in enumerate(LOUDNESS_SLOPES)}
            return Design({0: _row(cin, 3, taps)}, {})
        if residual:  # carried by the residual connection: the designed row adds zero
            return Design({0: _row(cin, 3, {})}, {})
        if index in _ENCODER_TAPS:
            taps, bias = _ENCODER_TAPS[index]
            return Design({0: _row(cin, 3, {0: taps}, bias)}, {})
        rows = {}
        for i, wi in OPEN_ROWS_ALL.items():
            for k, wk in OPEN_COLS_ALL.items():
                # Cell (i, k) of fuse's grid reads position (2i - 2, 2k - 2) of a channel's
                # 16x16 (audio.4: stride 2, padding 3), the channel being the first half of a
                # feature row: feature 16 (2i - 2) + 2k - 2.
                rows[16 * (2 * i - 2) + 2 * k - 2] = _row(cin, 1, {0: OPEN_FEATURE * wi * wk})
        return Design(rows, {})

    def outc(self, sig: Sig, cin: int, cout: int) -> Design:
        """The output conv: designed logits to B, G, R (the luma and chroma pair: B = l0 - l1,
        G = l0, R = l0 + l1); the random channels of up5 are not read."""
        logits = [sig[f"l{k}"] for k in range(len(sig))]
        rows = {}
        for c in range(cout):
            taps = {logits[c]: 1.0} if len(logits) == 3 else {logits[0]: 1.0, logits[1]: c - 1.0}
            rows[c] = _row(cin, 1, taps)
        return Design(rows, {})
