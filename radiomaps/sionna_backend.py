"""Import Sionna RT on whatever this machine has: the CUDA backend where Dr.Jit finds a GPU,
else its LLVM backend, with a usable libLLVM found here when DRJIT_LIBLLVM_PATH is unset.

Dr.Jit JIT-compiles through libLLVM at run time. LLVM 14 and 15 crash in it (seen with
Debian 12's own), so the search takes LLVM 16 or newer, newest first.
"""
from __future__ import annotations

import glob
import os
import re
from types import ModuleType

MIN_LLVM = 16
# where distributions put libLLVM; RADIODIFF_LLVM_DIRS (':'-separated) replaces the list
LLVM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", "/usr/lib/llvm-*/lib", "/opt/homebrew/opt/llvm/lib",
             "/usr/local/opt/llvm/lib")
INSTALL_HINT = ("install an LLVM runtime of version >= 16 (Debian/Ubuntu: `apt-get install "
                "libllvm19`; macOS: `brew install llvm`) or point DRJIT_LIBLLVM_PATH at a "
                "libLLVM shared library")
EXTRA_HINT = "and the ray tracer itself: pip install -e '.[raytrace]'"


class RayTracerUnavailable(RuntimeError):
    """Sionna RT cannot run here; the message says what to install."""


def _version(path: str) -> int:
    """LLVM major version from a library's file name or folder (0 when it says none)."""
    found = re.findall(r"(?:LLVM[-.]|llvm-)(\d+)", path)
    return int(found[-1]) if found else 0


def find_libllvm() -> str | None:
    """The newest libLLVM of version >= MIN_LLVM in the usual places, or None."""
    dirs = os.environ.get("RADIODIFF_LLVM_DIRS")
    dirs = dirs.split(":") if dirs is not None else LLVM_DIRS
    candidates = set()
    for pattern in dirs:
        for folder in glob.glob(pattern):
            candidates.update(glob.glob(os.path.join(folder, "libLLVM*.so*")))
            candidates.update(glob.glob(os.path.join(folder, "libLLVM*.dylib")))
    usable = [p for p in candidates if _version(p) >= MIN_LLVM and os.path.isfile(p)]
    return max(usable, key=lambda p: (_version(p), len(p))) if usable else None


def _configure_llvm() -> str | None:
    """Set DRJIT_LIBLLVM_PATH unless it is set; return the library Dr.Jit will load."""
    chosen = os.environ.get("DRJIT_LIBLLVM_PATH")
    if chosen:
        if not os.path.isfile(chosen):
            raise RayTracerUnavailable(f"DRJIT_LIBLLVM_PATH={chosen}: no such file; "
                                       f"{INSTALL_HINT}")
        return chosen
    chosen = find_libllvm()
    if chosen:
        os.environ["DRJIT_LIBLLVM_PATH"] = chosen
    return chosen


def load_sionna_rt() -> ModuleType:
    """`sionna.rt`, with Mitsuba's variant chosen: CUDA if Dr.Jit sees a GPU, else LLVM."""
    llvm = _configure_llvm()  # before Dr.Jit is first imported: it reads the variable then
    try:
        import drjit as dr
        import mitsuba as mi
    except ImportError as err:
        raise RayTracerUnavailable(f"the ray tracer is not installed ({err.name} is missing); "
                                   f"{EXTRA_HINT}, and {INSTALL_HINT}") from None
    if mi.variant() is None:
        if dr.has_backend(dr.JitBackend.CUDA):
            mi.set_variant("cuda_ad_mono_polarized")
        elif llvm and dr.has_backend(dr.JitBackend.LLVM):
            mi.set_variant("llvm_ad_mono_polarized")
        else:  # never let Dr.Jit fall back on its own choice: that may be LLVM 14/15
            found = f"{llvm} did not load" if llvm else f"no libLLVM >= {MIN_LLVM} found"
            searched = os.environ.get("RADIODIFF_LLVM_DIRS") or ":".join(LLVM_DIRS)
            raise RayTracerUnavailable(f"no usable LLVM runtime for the ray tracer ({found}; "
                                       f"searched {searched}): {INSTALL_HINT}")
    import sionna.rt
    return sionna.rt
