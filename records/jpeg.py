"""A record's JPEG checked: its header structure (cheap, no decode: the Loader runs it on every
record before DALI sees it) and a full decode (PIL, then libturbojpeg's strict mode where
installed: prep.verify's check, and the Loader's search for the record a failed DALI run
could not decode)."""
from __future__ import annotations

import ctypes
import ctypes.util
import io

import numpy as np

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}     # start-of-frame markers (any coding)
_SEGMENTS = _SOF | {0xC4, 0xCC, 0xDB, 0xDD, 0xFE} | set(range(0xE0, 0xF0))  # DHT DAC DQT DRI COM APPn


def jpeg_structure_error(data) -> str | None:
    """What is wrong with the structure of a record's JPEG (``data``: bytes or a uint8 array),
    or None: start- and end-of-image markers, then every marker segment up to the scan — a
    known marker, a length inside the file, quantisation tables without zeros, Huffman tables
    whose code counts fit, one frame header (8-bit, 1 or 3 components, non-zero size) — before
    the scan. It reads the header (~600 bytes in a record) and decodes nothing: a damaged scan
    (the entropy-coded data) passes, which only a decode finds (prep.verify). The Loader runs
    it on every record before DALI sees it: DALI's CPU decoder can crash the whole process
    (SIGSEGV in one of its threads) on a damaged header."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "no start-of-image marker: its first bytes are damaged"
    if data[n - 2] != 0xFF or data[n - 1] != 0xD9:
        return "no end-of-image marker: it is cut short or its last bytes are damaged"
    head = bytes(data[:4096])                   # Python bytes: far cheaper to index than an array
    pos, frame, tables = 2, False, False
    while True:
        if pos + 4 > n - 2:
            return f"header damaged at byte {pos}: a marker was expected"
        if pos + 4 > len(head):                 # fill bytes ran past the first read
            head = bytes(data[:pos + 4096])
        if head[pos] != 0xFF:
            return f"header damaged at byte {pos}: a marker was expected"
        if head[pos + 1] == 0xFF:                # a fill byte before the marker (the standard allows any)
            pos += 1
            continue
        marker, length = head[pos + 1], (head[pos + 2] << 8) | head[pos + 3]
        end = pos + 2 + length
        if length < 2 or end >= n - 2:
            return f"header damaged: a segment at byte {pos} of length {length} runs past the data"
        if end + 4 > len(head):                 # a header longer than the first read (big APPn)
            head = bytes(data[:end + 4096])
        if marker == 0xDA:
            if not (frame and tables) or length < 8:
                return f"header damaged: a bad scan header at byte {pos}"
            return None
        if marker not in _SEGMENTS:
            return f"header damaged: invalid marker 0x{marker:02X} at byte {pos}"
        body = head[pos + 4:end]
        if marker in _SOF:
            comps = body[5] if len(body) >= 6 else 0
            if (frame or len(body) != 6 + 3 * comps or body[0] != 8 or comps not in (1, 3)
                    or not ((body[1] << 8) | body[2]) or not ((body[3] << 8) | body[4])):
                return f"header damaged: a bad frame header at byte {pos}"
            frame = True
        elif marker == 0xDB:                    # DQT: (precision|id, 64 or 128 bytes) ...
            i = 0
            while i < len(body):
                size = 128 if body[i] >> 4 else 64
                table = body[i + 1:i + 1 + size]
                if body[i] & 0xEC or len(table) != size or (size == 64 and 0 in table):
                    return f"header damaged: a bad quantisation table at byte {pos}"
                i += 1 + size
            tables = True
        elif marker == 0xC4:                    # DHT: (class|id, 16 counts, symbols) ...
            i = 0
            while i < len(body):
                counts = sum(body[i + 1:i + 17])
                if body[i] & 0xEC or i + 17 > len(body) or i + 17 + counts > len(body):
                    return f"header damaged: a bad Huffman table at byte {pos}"
                i += 17 + counts
        pos = end


class StrictJpeg:
    """libturbojpeg with TJFLAG_STOPONWARNING: "Corrupt JPEG data" warnings become errors.
    ``available`` is False where the library is not installed."""
    STOP_ON_WARNING, PIXEL_RGB = 8192, 0

    def __init__(self):
        name = ctypes.util.find_library("turbojpeg")
        self.available = False
        if name is None:
            return
        try:
            lib = ctypes.CDLL(name)
            lib.tjInitDecompress.restype = ctypes.c_void_p
            lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong] + \
                [ctypes.POINTER(ctypes.c_int)] * 4
            lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong,
                                          ctypes.c_void_p] + [ctypes.c_int] * 5
            lib.tjGetErrorStr2.restype = ctypes.c_char_p
            lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
            self._handle = lib.tjInitDecompress()
        except (OSError, AttributeError):
            return
        self._lib, self.available = lib, bool(self._handle)

    def error(self, jpeg: bytes) -> str | None:
        """None if ``jpeg`` decodes without a warning, else libjpeg's message."""
        lib, h = self._lib, self._handle
        w, ht, sub, cs = (ctypes.c_int() for _ in range(4))
        if lib.tjDecompressHeader3(h, jpeg, len(jpeg), *(ctypes.byref(v) for v in (w, ht, sub, cs))):
            return lib.tjGetErrorStr2(h).decode(errors="replace")
        out = np.empty((ht.value, w.value, 3), np.uint8)
        if lib.tjDecompress2(h, jpeg, len(jpeg), out.ctypes.data, w.value, 0, ht.value,
                             self.PIXEL_RGB, self.STOP_ON_WARNING):
            return lib.tjGetErrorStr2(h).decode(errors="replace")
        return None


_STRICT: StrictJpeg | None = None   # one per worker process (a decompressor handle)


def jpeg_error(jpeg: bytes) -> str | None:
    """Why ``jpeg`` is not a good JPEG (the structure check the Loader runs before DALI, PIL,
    then the strict decoder), or None."""
    from PIL import Image
    global _STRICT
    if why := jpeg_structure_error(jpeg):
        return f"bad JPEG ({why})"
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            image.convert("RGB").load()
    except Image.UnidentifiedImageError:       # its message names a BytesIO object, not the data
        return "bad JPEG (no image header PIL can identify)"
    except Exception as exc:      # PIL raises OSError, SyntaxError, ValueError... for bad data
        return f"bad JPEG ({exc})"
    if _STRICT is None:
        _STRICT = StrictJpeg()
    if _STRICT.available and (message := _STRICT.error(jpeg)):
        return f"bad JPEG ({message})"
    return None
