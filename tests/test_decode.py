"""Decoding: every supported format becomes RGB uint8; every broken input is a typed DecodeError."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from allcluster.data import decode as dec
from allcluster.data.normalize import Normalize
from allcluster.data.preprocess import Preprocess, roi_crop
from imagezoo import EXPECTED_ERROR, bad_files, good_files, rgb_array


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    return good_files(folder / "good"), bad_files(folder / "bad")


@pytest.mark.parametrize("kind", ["jpeg", "png", "bmp", "tiff8", "gray_png", "rgba_png", "palette_png",
                                  "cmyk_jpeg", "tiff16_gray", "tiff16_rgb", "gif", "webp", "jpeg2000", "ppm"])
def test_supported_formats_decode_to_rgb_uint8(zoo, kind):
    image = dec.load(zoo[0][kind])
    assert image.array.dtype == np.uint8 and image.array.shape == (40, 40, 3)
    assert (image.width, image.height) == (40, 40)


def test_lossless_formats_keep_pixels_exactly(zoo):
    expected = rgb_array()
    for kind in ("png", "bmp", "tiff8"):
        np.testing.assert_array_equal(dec.load(zoo[0][kind]).array, expected)
    # 16-bit samples are scaled back to 8 bits (x * 257 / 257)
    np.testing.assert_array_equal(dec.load(zoo[0]["tiff16_rgb"]).array, expected)
    np.testing.assert_array_equal(dec.load(zoo[0]["tiff16_gray"]).array[..., 1], expected[..., 0])


def test_rgba_is_composited_on_white(zoo):
    arr = dec.load(zoo[0]["rgba_png"]).array.astype(int)
    expected = (rgb_array().astype(int) * 128 + 255 * 127) / 255
    assert np.abs(arr - expected).max() <= 1


@pytest.mark.parametrize("name", sorted(EXPECTED_ERROR))
def test_broken_inputs_raise_typed_errors_naming_the_file(zoo, name):
    path = zoo[1][name]
    with pytest.raises(dec.DecodeError) as err:
        dec.load(path)
    assert err.value.kind == EXPECTED_ERROR[name]
    assert str(path) in str(err.value)


def _encoded(fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb_array(300, seed=1)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _tifffile_bytes(**options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb_array(300, seed=1), **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, options", [
    ("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("PPM", {}), ("WEBP", {}), ("WEBP", {"lossless": True}),
    ("JPEG2000", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("TIFF", {"compression": "tiff_adobe_deflate"}),
    ("tifffile", {}), ("tifffile", {"bigtiff": True}), ("tifffile", {"byteorder": ">"}),
    ("tifffile", {"bigtiff": True, "byteorder": ">"})])
def test_an_image_cut_short_in_any_format_is_truncated_so_the_rerun_scores_it(fmt, options):
    """A copy still in progress must be the transient ``truncated``: Pillow calls a cut TIFF, WebP or JPEG
    2000 undecodable or no image at all, which no rerun would try again. Cut anywhere: in the pixels, in
    a TIFF's directory (Pillow writes it last, tifffile first), in a value the directory points to."""
    data = _tifffile_bytes(**options) if fmt == "tifffile" else _encoded(fmt, **options)
    whole = dec.decode(data, "whole").array
    assert whole.shape == (300, 300, 3)
    cuts = sorted({*range(16, 400, 23), *(int(len(data) * f) for f in (0.5, 0.99)), *range(len(data) - 300, len(data), 23)})
    failed = 0
    for cut in cuts:
        try:        # a PNG or GIF cut in its closing chunk still holds every pixel: Pillow decodes it whole
            assert np.array_equal(dec.decode(data[:cut], "part.img").array, whole), cut
        except dec.DecodeError as err:
            failed += 1
            assert err.kind == "truncated" and "part.img" in str(err), (cut, str(err))
    assert failed >= len(cuts) - 3


def test_a_broken_image_of_full_length_stays_undecodable():
    data = bytearray(_encoded("WEBP"))
    data[20:30] = b"\xff" * 10                   # a damaged VP8 header, not a cut: no rerun would help
    jp2 = bytearray(_encoded("JPEG2000"))
    jp2[200:260] = bytes(60)                       # damaged, and a box after the codestream (no FFD9 at the end)
    for name, broken in (("bad.webp", bytes(data)), ("bad.jp2", bytes(jp2) + b"\x00\x00\x00\x0cxml <x/>")):
        with pytest.raises(dec.DecodeError) as err:
            dec.decode(broken, name)
        assert err.value.kind == "undecodable", name
    with pytest.raises(dec.DecodeError) as err:
        dec.decode(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 200, "noise.tif")    # TIFF magic, then noise
    assert err.value.kind == "undecodable"


def test_postscript_in_a_dump_is_no_image_and_never_reaches_ghostscript(monkeypatch):
    """Pillow hands EPS (whatever the file's name) to Ghostscript where one is installed: untrusted input
    must not run a PostScript interpreter, so only the formats of ``READ_FORMATS`` are opened."""
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or Image.new("RGB", (40, 40)))
    for fmt in ("EPS", "ICO"):
        with pytest.raises(dec.DecodeError) as err:
            dec.decode(_encoded(fmt), f"slide.{fmt.lower()}")
        assert err.value.kind == "not_an_image" and "JPEG, PNG, TIFF" in str(err.value)
    assert not calls
    Image.init()
    assert set(dec.READ_FORMATS) <= set(Image.OPEN), "a name Pillow does not know would fail every open"


def test_bomb_is_refused_before_decoding(zoo):
    with pytest.raises(dec.DecodeError, match="exceeds the limit of"):
        dec.load(zoo[1]["bomb"], max_pixels=1_000_000)


def test_missing_and_unreadable_files_are_decode_errors(tmp_path):
    with pytest.raises(dec.DecodeError) as err:
        dec.load(tmp_path / "nope.jpg")
    assert err.value.kind == "unreadable"
    with pytest.raises(dec.DecodeError) as err:
        dec.load(tmp_path)
    assert err.value.kind == "unreadable"


def test_a_symlink_loop_named_in_a_list_is_a_symlink_loop_as_in_a_listed_folder(tmp_path):
    """ELOOP is the link's own fault: deterministic ``symlink_loop`` (the folder listing's type), not a
    transient ``unreadable`` that every rerun and requeue would try again."""
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    with pytest.raises(dec.DecodeError) as err:
        dec.read_hashed(tmp_path / "a.jpg")
    assert (err.value.kind, str(err.value)) == ("symlink_loop", f"{tmp_path / 'a.jpg'}: symlink loop")
    assert "symlink_loop" not in dec.TRANSIENT_ERRORS


def test_preprocess_resizes_and_normalize_standardises():
    rgb = rgb_array(50)
    out = Preprocess(32)(rgb)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    import torch
    norm = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.from_numpy(out).permute(2, 0, 1)[None]
    y = norm(x)
    expected = (x.float() / 255 - 0.5) / 0.25
    assert torch.allclose(y, expected, atol=1e-5)


def test_roi_crop_trims_black_margins_and_background_to_the_cell():
    canvas = np.zeros((100, 100, 3), np.uint8)                  # black acquisition margin
    canvas[10:90, 10:90] = (235, 225, 230)                      # bright slide background
    yy, xx = np.mgrid[:100, :100]
    cell = (yy - 50) ** 2 + (xx - 40) ** 2 < 15 ** 2            # a stained (saturated) cell
    canvas[cell] = (120, 40, 150)
    cropped = roi_crop(canvas, margin=0.0)
    assert cropped.shape[0] in range(28, 33) and cropped.shape[1] in range(28, 33)


def test_roi_crop_keeps_images_without_a_plausible_region():
    flat = np.full((64, 64, 3), 200, np.uint8)
    assert roi_crop(flat).shape == flat.shape


def _tiff16(gray: np.ndarray, **tags) -> bytes:
    """A 16-bit gray TIFF written by PIL, with extra TIFF ``tags`` (tag number: value)."""
    import io

    from PIL import Image, TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, value in tags.items():
        info[int(tag)] = value
    out = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16)).save(out, format="TIFF", tiffinfo=info)
    return out.getvalue()


def test_a_12_bit_tiff_in_a_16_bit_container_is_scaled_by_the_maximum_it_declares():
    import io

    import tifffile

    twelve_bit = np.tile(np.linspace(0, 4095, 40).round(), (40, 1))        # a 12-bit camera's full range
    gray = dec.decode(_tiff16(twelve_bit, **{"341": 4095}), "cam.tif").array   # SMaxSampleValue
    np.testing.assert_array_equal(gray[..., 0], np.rint(twelve_bit / 4095 * 255))  # 0..255, not 0..16
    rgb = io.BytesIO()                                    # 16-bit RGB: read by the tifffile fallback
    tifffile.imwrite(rgb, np.repeat(twelve_bit[..., None], 3, axis=2).astype(np.uint16), photometric="rgb",
                     extratags=[(341, "H", 3, (4095, 4095, 4095), True)])
    np.testing.assert_array_equal(dec.decode(rgb.getvalue(), "cam-rgb.tif").array, gray)


def test_wide_samples_are_scaled_to_8_bits_within_a_few_times_their_own_bytes():
    """A large 16-bit RGB slide (allowed by max_pixels) is scaled in one float32 copy: float64
    temporaries took 12x its bytes, and a few such files at once on a node meant the OOM killer."""
    import tracemalloc

    wide = np.random.default_rng(0).integers(0, 65536, size=(1500, 2000, 3), dtype=np.uint16)
    tracemalloc.start()
    try:
        scaled = dec._wide_to_uint8(wide)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3.5 * wide.nbytes, f"peak {peak / wide.nbytes:.1f}x the samples' bytes"
    np.testing.assert_array_equal(scaled, np.rint(wide / 65535 * 255).astype(np.uint8))


def _lzw_rgb16_tiff(rgb: np.ndarray, declared_max: int) -> bytes:
    """A little-endian 16-bit RGB TIFF, LZW-compressed (the microscope exports' usual kind), which
    tifffile cannot decompress without the imagecodecs package. LZW by hand: literal 9-bit codes with a
    clear code every 200 bytes, so the code table never grows past 9 bits."""
    import struct

    codes = []
    raw = rgb.astype("<u2").tobytes()
    for i in range(0, len(raw), 200):
        codes += [256, *raw[i:i + 200]]
    bits = count = 0
    pixels = bytearray()
    for code in [*codes, 257]:
        bits, count = bits << 9 | code, count + 9
        while count >= 8:
            count -= 8
            pixels.append(bits >> count & 255)
    if count:
        pixels.append(bits << (8 - count) & 255)
    height, width = rgb.shape[:2]
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, "bits"), (259, 3, 1, 5), (262, 3, 1, 2),
               (273, 4, 1, "pixels"), (277, 3, 1, 3), (278, 3, 1, height), (279, 4, 1, len(pixels)),
               (341, 3, 3, "max")]
    after = 8 + 2 + 12 * len(entries) + 4
    offsets = {"bits": after, "max": after + 6, "pixels": after + 12}
    ifd = b"".join(struct.pack("<HHII", tag, kind, n, offsets[v]) if isinstance(v, str)
                   else struct.pack("<HHIHH", tag, kind, n, v, 0) if kind == 3 else struct.pack("<HHII", tag, kind, n, v)
                   for tag, kind, n, v in entries)
    return (b"II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0)
            + struct.pack("<6H", 16, 16, 16, *(declared_max,) * 3) + bytes(pixels))


def test_a_compressed_12_bit_rgb_tiff_tifffile_cannot_read_still_decodes():
    """Its declared 12 bits send it to tifffile, which cannot decompress LZW here: PIL's reading, as
    before the bit-depth fix, not an ``undecodable`` row that no rerun retries."""
    twelve_bit = np.repeat(np.tile(np.linspace(0, 4095, 40).round(), (40, 1))[..., None], 3, axis=2)
    data = _lzw_rgb16_tiff(twelve_bit, 4095)
    assert dec.decode(data, "lzw.tif").array.shape == (40, 40, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_read_by_tifffile_is_turned_upright_as_pils_path_turns_it(orientation):
    import io

    import tifffile

    rgb = np.arange(24 * 40 * 3, dtype=np.uint32).reshape(24, 40, 3) % 251
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, rgb.astype(np.uint8), photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    by_pil = dec.decode(tiff.getvalue(), "o.tif").array
    assert by_pil.shape[:2] == ((40, 24) if orientation >= 5 else (24, 40))
    np.testing.assert_array_equal(dec._decode_with_tifffile(tiff.getvalue(), "o.tif", 10**8, 1).array, by_pil)


def test_a_file_whose_decode_finds_no_memory_is_a_transient_row_not_undecodable(tmp_path):
    """A real MemoryError: the decoding process's address space is capped just above what it holds
    (a node shared with other jobs). It was ``undecodable``, which no rerun tries again."""
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import REPO

    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 6000), (200, 100, 150)).save(big)      # 120 KB on disk, 144 MB in PIL
    capped = (
        "import resource, sys\n"
        "from allcluster.data import decode as dec\n"
        "from allcluster.data.preprocess import Preprocess, decode_preprocessed\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "held = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (held + 40 * 2**20, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    decode_preprocessed(data, sys.argv[1], Preprocess(64))\n"
        "except dec.DecodeError as err:\n"
        "    print(err.kind, '|', err)\n")
    run = subprocess.run([sys.executable, "-c", capped, str(big)], cwd=REPO, capture_output=True, text=True, timeout=120)
    kind, message = run.stdout.strip().split(" | ")
    assert kind == "out_of_memory" and kind in dec.TRANSIENT_ERRORS, run.stdout + run.stderr
    assert str(big) in message and "a rerun tries it again" in message


def test_a_16_bit_tiff_that_declares_no_smaller_bit_depth_keeps_the_full_16_bit_scale():
    values = np.full((40, 40), 4095)          # a dark 16-bit image is not mistaken for bright 12-bit data
    assert (dec.decode(_tiff16(values), "dark.tif").array == 16).all()
    assert (dec.decode(_tiff16(values, **{"341": 65535}), "declared.tif").array == 16).all()


def large_cell_jpeg(width: int = 2400, height: int = 1800, radius: int = 150) -> bytes:
    """A large microscope-like JPEG: a small striped stained cell (stripes 3 pixels wide) on a bright
    slide; the ROI crop is a few hundred pixels of a 2400-pixel-wide image."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[:height, :width]
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = (235, 225, 230)
    cell = (yy - 700) ** 2 + (xx - 1300) ** 2 < radius ** 2
    stripes = (xx // 3) % 2 == 1
    canvas[cell & stripes], canvas[cell & ~stripes] = (150, 40, 170), (90, 20, 120)
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, "JPEG", quality=95)
    return out.getvalue()


def detail(rgb: np.ndarray) -> float:
    """Mean absolute difference of horizontal neighbours: how much of the stripes' detail is left."""
    return float(np.abs(np.diff(rgb.astype(int), axis=1)).mean())


def test_the_roi_crop_of_a_large_jpeg_keeps_the_detail_of_the_full_resolution_decode():
    from allcluster.data.preprocess import decode_preprocessed

    data = large_cell_jpeg()
    for size in (128, 224):
        prep = Preprocess(size, roi_crop=True)
        image, pixels = decode_preprocessed(data, "large.jpg", prep)
        assert (image.width, image.height) == (2400, 1800) and pixels.shape == (size, size, 3)
        full = prep(dec.decode(data).array)                      # cropped from the full resolution
        assert detail(pixels) > 0.9 * detail(full), size
        assert detail(prep(dec.decode(data, draft=size).array)) < 0.5 * detail(full), "the draft alone loses it"
