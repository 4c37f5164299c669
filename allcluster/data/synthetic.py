"""SYNTHETIC smear-like single-white-cell images for the demo and the tests.

These images are made up by a small procedural renderer. They are NOT blood smears, NOT patient
data and carry NO medical meaning: they exist so that ``allcluster demo`` and the test suite can
run the whole pipeline (index -> train -> evaluate) with no data and no downloads.

The four classes borrow the folder names of the ALL dataset of Aria et al. (2021) -- ``Benign``,
``Early``, ``Pre``, ``Pro`` -- and each is drawn with a loose, cartoon version of a textbook
morphology cue, so a small CNN has something learnable (but not trivial) to find:

* ``Benign``: smaller round cell, dense, homogeneous, blue-black nucleus, scant cytoplasm;
* ``Early``:  larger cell, round nucleus with fine chromatin texture, thin cytoplasm;
* ``Pre``:    larger cell, irregular, indented (cleft / kidney-shaped) nucleus, moderate cytoplasm;
* ``Pro``:    largest cell, fine chromatin with 1-3 pale nucleoli, more cytoplasm.

Size, shape, rotation, position, stain colours and texture are randomised within each class and the
class distributions overlap, so the task is learnable but not solved on the first epoch. Everything
is deterministic for a given :class:`numpy.random.Generator` (``render_cell``) or seed
(``generate``: the same seed writes byte-identical files).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

__all__ = ["CLASSES", "render_cell", "generate"]

CLASSES = ("Benign", "Early", "Pre", "Pro")

# Colours are handled as optical densities (Beer-Lambert): pixel = background * exp(-sum of ODs),
# so overlapping objects darken each other the way stained material does under a microscope.
_BG_WARM = np.array([242.0, 240.0, 224.0])      # yellowish illumination
_BG_COOL = np.array([226.0, 236.0, 247.0])      # bluish illumination
_RBC_LILAC = np.array([0.34, 0.32, 0.07])        # lilac-grey red cells (as in the ALL images)
_RBC_PINK = np.array([0.08, 0.34, 0.24])         # pale red-pink red cells
_NUC_VIOLET = np.array([0.95, 1.25, 0.16])       # blue-violet nucleus
_NUC_MAGENTA = np.array([0.55, 1.15, 0.22])      # magenta-violet nucleus
_CYTO_BLUE = np.array([0.26, 0.20, 0.03])        # light blue / lilac cytoplasm

# Per-class morphology, lengths as fractions of the image side. Ranges overlap on purpose.
# cell: cell radius; ratio: nucleus radius / cell radius; od: nucleus stain strength;
# tex: (amplitude, grain in px at 96 px) of chromatin texture; wobble: boundary irregularity;
# indent: (probability, depth range) of a cleft; nucleoli: (probability, count range, paleness);
# cyto: cytoplasm stain strength; tint: per-channel nucleus stain factor (dense chromatin stains
# blue-black).
_MORPH = {
    "Benign": dict(cell=(0.13, 0.17), ratio=(0.86, 0.94), od=(1.35, 1.65), tex=((0.03, 0.08), 2.0),
                   wobble=(0.0, 0.03), elong=(1.0, 1.1), indent=(0.04, (0.05, 0.15)),
                   nucleoli=(0.0, (1, 1), (0.0, 0.0)), cyto=(0.7, 1.0), tint=(1.3, 1.0, 1.4)),
    "Early": dict(cell=(0.21, 0.255), ratio=(0.84, 0.93), od=(1.0, 1.15), tex=((0.3, 0.42), 1.4),
                  wobble=(0.0, 0.03), elong=(1.0, 1.1), indent=(0.05, (0.05, 0.2)),
                  nucleoli=(0.05, (1, 1), (0.2, 0.35)), cyto=(0.8, 1.1)),
    "Pre": dict(cell=(0.2, 0.25), ratio=(0.64, 0.76), od=(0.84, 1.0), tex=((0.4, 0.52), 3.0),
                wobble=(0.05, 0.11), elong=(1.1, 1.4), indent=(0.95, (0.3, 0.6)),
                nucleoli=(0.04, (1, 1), (0.2, 0.35)), cyto=(0.9, 1.2)),
    "Pro": dict(cell=(0.24, 0.3), ratio=(0.56, 0.68), od=(0.7, 0.88), tex=((0.1, 0.18), 0.8),
                wobble=(0.0, 0.05), elong=(1.0, 1.15), indent=(0.05, (0.05, 0.2)),
                nucleoli=(0.9, (1, 3), (0.65, 0.9)), cyto=(1.1, 1.45)),
}


def _u(rng: np.random.Generator, bounds) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _window(size: int, cy: float, cx: float, extent: float):
    """Row and column slices of the square of half-side ``extent`` around (cy, cx), or None if off-image."""
    y0, y1 = max(int(cy - extent), 0), min(int(np.ceil(cy + extent)) + 1, size)
    x0, x1 = max(int(cx - extent), 0), min(int(np.ceil(cx + extent)) + 1, size)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _texture(rng: np.random.Generator, shape: tuple[int, int], grain: float) -> np.ndarray:
    """Zero-mean, unit-std smoothed noise: ``grain`` is the blur sigma in pixels."""
    noise = _blur(rng.standard_normal(shape).astype(np.float32), grain)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _blob(yy, xx, cy, cx, radius, elong, angle, wobble, phases, soft):
    """Soft mask of a rotated ellipse with a wobbly boundary (a few low angular harmonics)."""
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u = (dx * ca + dy * sa) / elong
    v = (-dx * sa + dy * ca) * elong
    rho = np.sqrt(u * u + v * v)
    bound = np.full_like(rho, radius)
    if wobble > 0:
        theta = np.arctan2(v, u)
        bend = np.zeros_like(rho)
        for k, (amp, phase) in enumerate(phases, start=2):
            bend += amp * np.cos(k * theta + phase)
        bound = radius * (1.0 + wobble * bend)
    return _sigmoid((bound - rho) / soft)


def _phases(rng: np.random.Generator) -> list[tuple[float, float]]:
    amps = rng.normal(0.0, 1.0, 4) / np.arange(1, 5)
    return list(zip(amps.tolist(), rng.uniform(0, 2 * np.pi, 4).tolist()))


def _white_cell(rng, cls, size, yy, xx, cy, cx, scale, stain, od, mask):
    """Add one white cell centred near (cy, cx) to ``od`` (H, W, 3) and ``mask`` (H, W), in place."""
    m = _MORPH[cls]
    px = size / 96.0                                   # lengths below are tuned at 96 px
    soft = 0.55 * max(px, 0.5)
    cell_r = _u(rng, m["cell"]) * size * scale
    cell_elong, cell_angle, cell_phases = rng.uniform(1.0, 1.08), rng.uniform(0, np.pi), _phases(rng)
    nuc_r = cell_r * _u(rng, m["ratio"])
    off = (cell_r - nuc_r) * rng.uniform(0.0, 0.7)
    off_angle = rng.uniform(0, 2 * np.pi)
    ny, nx = cy + off * np.sin(off_angle), cx + off * np.cos(off_angle)
    nuc_elong, nuc_angle, nuc_wobble = _u(rng, m["elong"]), rng.uniform(0, np.pi), _u(rng, m["wobble"])
    nuc_phases = _phases(rng)
    p_indent, depth = m["indent"]
    indent = rng.random() < p_indent
    bite_r, bite_d, bite_a = nuc_r * rng.uniform(0.4, 0.7), _u(rng, depth) * nuc_r, rng.uniform(0, 2 * np.pi)
    amp_range, grain = m["tex"]
    tex_amp = _u(rng, amp_range)
    p_nucleoli, count, pale = m["nucleoli"]
    n_nucleoli = int(rng.integers(count[0], count[1] + 1)) if rng.random() < p_nucleoli else 0
    nucleoli = [(nuc_r * rng.uniform(0.0, 0.5), rng.uniform(0, 2 * np.pi), nuc_r * rng.uniform(0.2, 0.3),
                 _u(rng, pale)) for _ in range(n_nucleoli)]
    nuc_od = stain["nuc"] * np.asarray(m.get("tint", (1.0, 1.0, 1.0))) * _u(rng, m["od"])
    cyto_od = stain["cyto"] * _u(rng, m["cyto"])

    win = _window(size, cy, cx, cell_r * 1.25 + 4 * soft)
    noise_shape = (win[0].stop - win[0].start, win[1].stop - win[1].start) if win else (1, 1)
    texture = _texture(rng, noise_shape, max(grain * px, 0.4))   # drawn even off-image: same stream
    if win is None:
        return
    sy, sx = win
    yy, xx = yy[sy, sx], xx[sy, sx]
    cell = _blob(yy, xx, cy, cx, cell_r, cell_elong, cell_angle, 0.03, cell_phases, soft)
    nuc = _blob(yy, xx, ny, nx, nuc_r, nuc_elong, nuc_angle, nuc_wobble, nuc_phases, soft)
    if indent:                                         # a cleft: bite a disc out of the nucleus
        dist = nuc_r + bite_r - bite_d                 # bite_d: how far it reaches into the nucleus
        bite = _blob(yy, xx, ny + dist * np.sin(bite_a), nx + dist * np.cos(bite_a), bite_r, 1.0, 0.0, 0.0,
                     [], soft)
        nuc = nuc * (1.0 - bite)
    chromatin = 1.0 + tex_amp * texture
    for rr, a, spot_r, paleness in nucleoli:           # pale, slightly sharp-edged spots
        dy, dx = yy - (ny + rr * np.sin(a)), xx - (nx + rr * np.cos(a))
        spot = _sigmoid((spot_r - np.sqrt(dx * dx + dy * dy)) / (0.35 * soft + 0.08 * spot_r))
        chromatin = chromatin * (1.0 - paleness * spot)
    od[sy, sx] += cell[..., None] * cyto_od + (nuc * np.clip(chromatin, 0.2, 2.0))[..., None] * nuc_od
    mask[sy, sx] = np.maximum(mask[sy, sx], cell)


def render_cell(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    """One SYNTHETIC smear-like image (size, size, 3) uint8 RGB with one white cell of class ``cls``.

    Background with red cells (random count, radius, position, slight overlap, soft edges, pale
    centres), stain-colour jitter, slight blur and noise; the white cell's morphology expresses the
    class (see the module docstring). Deterministic given ``rng``'s state.
    """
    if cls not in _MORPH:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    px = size / 96.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # Stain and illumination jitter (per image, independent of the class).
    bg = _BG_WARM + rng.beta(2, 2) * (_BG_COOL - _BG_WARM) + rng.normal(0, 3, 3)
    hue = rng.uniform(0.9, 1.1, 3)
    stain = {
        "rbc": (_RBC_LILAC + rng.beta(1.5, 2.5) * (_RBC_PINK - _RBC_LILAC)) * hue * rng.uniform(0.8, 1.1),
        "nuc": (_NUC_VIOLET + rng.beta(2, 2) * (_NUC_MAGENTA - _NUC_VIOLET)) * rng.uniform(0.9, 1.1, 3),
        "cyto": _CYTO_BLUE * rng.uniform(0.85, 1.15, 3),
    }

    # The white cell, near the centre; sometimes a second one of the same class near an edge.
    cy, cx = size * (0.5 + rng.uniform(-0.08, 0.08, 2))
    scale = rng.uniform(0.93, 1.07)                    # magnification jitter
    wbc_od = np.zeros((size, size, 3), np.float32)
    wbc_mask = np.zeros((size, size), np.float32)
    _white_cell(rng, cls, size, yy, xx, cy, cx, scale, stain, wbc_od, wbc_mask)
    if rng.random() < 0.12:
        a = rng.uniform(0, 2 * np.pi)
        _white_cell(rng, cls, size, yy, xx, size * (0.5 + 0.52 * np.sin(a)), size * (0.5 + 0.52 * np.cos(a)),
                    scale, stain, wbc_od, wbc_mask)

    # Red cells: rejection-sampled centres (slight overlap allowed), each drawn in its own window.
    rbc_r = rng.uniform(0.075, 0.1) * size * scale
    target = int(rng.integers(10, 30))
    candidates = rng.uniform(-0.5 * rbc_r, size + 0.5 * rbc_r, (120, 2))
    centres = np.empty((0, 2))
    for point in candidates:
        if len(centres) >= target:
            break
        if not len(centres) or (((centres - point) ** 2).sum(1) > (1.35 * rbc_r) ** 2).all():
            centres = np.vstack([centres, point])
    n = len(centres)
    radius = rbc_r * rng.uniform(0.88, 1.12, n)
    elong = rng.uniform(1.0, 1.15, n)
    angle = rng.uniform(0, np.pi, n)
    pallor = rng.uniform(0.3, 0.6, n)
    soft = 0.7 * max(px, 0.5)
    rbc_od = np.zeros((size, size), np.float32)
    for (y, x), r, e, a, p in zip(centres, radius, elong, angle, pallor):
        win = _window(size, y, x, r * e + 4 * soft)
        if win is None:
            continue
        sy, sx = win
        dy, dx = yy[sy, sx] - y, xx[sy, sx] - x
        u = (dx * np.cos(a) + dy * np.sin(a)) / e
        v = (-dx * np.sin(a) + dy * np.cos(a)) * e
        rho = np.sqrt(u * u + v * v) / r
        disc = _sigmoid((1.0 - rho) * (r / soft))
        rbc_od[sy, sx] += disc * (1.0 - p * np.exp(-(rho / 0.55) ** 2))
    rbc_od = rbc_od * (1.0 - 0.9 * wbc_mask)            # the white cell lies on top

    od = rbc_od[..., None] * stain["rbc"].astype(np.float32) + wbc_od
    # Uneven illumination: a gentle gradient across the field.
    g = rng.normal(0, 0.04, 2)
    light = 1.0 + g[0] * (yy / size - 0.5) + g[1] * (xx / size - 0.5)
    image = bg.astype(np.float32) * light[..., None] * np.exp(-od)
    image = _blur(image, rng.uniform(0.3, 0.7) * px)
    image = image + rng.normal(0, rng.uniform(1.0, 3.5), image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate(out_dir: str | Path, n_per_class: int = 120, size: int = 96, seed: int = 0,
             fmt: str = "jpg") -> Path:
    """Write ``n_per_class`` SYNTHETIC images per class as ``<out_dir>/<Class>/synthetic-<class>-NNNN.<fmt>``.

    ``fmt`` is ``jpg`` (quality 92) or ``png``. Each image has its own random stream derived from
    ``(seed, class, index)``, so the same seed gives byte-identical files and the set does not
    depend on the order of writing. Returns ``out_dir``.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt in ("jpg", "jpeg"):
        fmt, save_kwargs = "jpg", {"format": "JPEG", "quality": 92}
    elif fmt == "png":
        save_kwargs = {"format": "PNG"}
    else:
        raise ValueError(f"fmt must be 'jpg' or 'png', got {fmt!r}")
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    for k, cls in enumerate(CLASSES):
        folder = out / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, k, i]))
            image = Image.fromarray(render_cell(rng, cls, size))
            image.save(folder / f"synthetic-{cls.lower()}-{i:04d}.{fmt}", **save_kwargs)
    return out
