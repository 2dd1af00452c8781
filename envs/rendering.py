"""Choose MuJoCo's headless OpenGL backend before robosuite is imported.

robosuite and mujoco read MUJOCO_GL once, at import, so the choice has to be made
(and written back to the environment, which worker processes inherit) first.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Mesa's software renderers (the Makefile's RENDER_PKGS lists the same packages for `make setup`).
APT_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libglib2.0-0 libosmesa6"
# libglvnd's EGL loader, which dispatches to the NVIDIA driver's EGL library.
NVIDIA_EGL_PACKAGES = "libegl1 libglvnd0 libopengl0"
_CANDIDATES = ("egl", "osmesa")

# A context of a few pixels is enough to prove the driver stack loads.
_PROBE = """
import mujoco
ctx = mujoco.GLContext(16, 16)
ctx.make_current()
ctx.free()
"""


class RenderingUnavailable(RuntimeError):
    pass


def _works(backend: str) -> bool:
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def preload_triton() -> None:
    """Load Triton's compiler library (if installed) before any OpenGL context exists.

    Mesa's software renderers (llvmpipe, OSMesa) bring their own LLVM, loaded with global symbol
    visibility; Triton's libtriton bundles another LLVM. When Mesa's is in the process first, loading
    libtriton afterwards (torch imports it on its first use of torch._dynamo) binds it to Mesa's LLVM
    symbols and the process dies with a segmentation fault (seen here with Mesa 22.3 and Triton 3.9,
    tests/test_env_libero.py). Loaded first, with local visibility, libtriton keeps its own LLVM and
    Python's later `import triton` reuses it. Nothing is imported (no torch, no triton Python code)."""
    import ctypes
    import glob
    import importlib.util

    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    for location in spec.submodule_search_locations:
        for lib in glob.glob(os.path.join(location, "_C", "libtriton*.so")):
            try:
                ctypes.CDLL(lib, mode=os.RTLD_LOCAL)
            except OSError:
                pass  # a broken install is Triton's own error to report when it is used
            return


def select_gl_backend() -> str:
    """Return the backend in use: MUJOCO_GL if set, else the first of egl, osmesa that works."""
    preload_triton()
    chosen = os.environ.get("MUJOCO_GL")
    if not chosen:
        for backend in _CANDIDATES:
            if _works(backend):
                chosen = backend
                break
        else:
            raise RenderingUnavailable(
                "No headless OpenGL backend works for MuJoCo (tried MUJOCO_GL=egl and MUJOCO_GL=osmesa). "
                f"On an NVIDIA GPU machine, MuJoCo renders on the GPU through EGL: install the EGL loader "
                f"(sudo apt-get install -y {NVIDIA_EGL_PACKAGES}; the driver brings its EGL vendor library) and, if "
                f"it is still not found, point glvnd at the driver's vendor file, e.g. "
                f"export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/share/glvnd/egl_vendor.d/10_nvidia.json. To render on the "
                f"CPU instead (slow, but anywhere): sudo apt-get install -y {APT_PACKAGES}"
            )
        os.environ["MUJOCO_GL"] = chosen
    if chosen in _CANDIDATES:
        # PyOpenGL must load the same platform or robosuite's EGL context refuses to start.
        os.environ.setdefault("PYOPENGL_PLATFORM", chosen)
    if chosen == "egl" and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        # robosuite picks the EGL device from CUDA_VISIBLE_DEVICES and crashes on an empty value (a job
        # given no GPU, e.g. by submitit): render on the first EGL device instead (Mesa's, without a GPU).
        os.environ.setdefault("MUJOCO_EGL_DEVICE_ID", "0")
    return chosen
