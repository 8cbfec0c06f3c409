"""Build lnlm_ssm's extensions: the C++ CPU one always, the CUDA one when it can be built.

Install torch first, then this package without build isolation, so that the
extensions are compiled against the torch you will run them with:

    pip install torch==2.13.0                      # the CPU build, on CPU machines
    pip install --no-build-isolation -v -e .       # -v shows what was built and why

After editing a .cpp, run the second command again (or, faster, `python
setup.py build_ext --inplace`, which keeps ninja's state in build/).

The environment variables that steer the build (LNLM_SSM_CUDA,
LNLM_SSM_CUDA_ARCHS, LNLM_SSM_PORTABLE, MAX_JOBS) are described in
lnlm_ssm/_build.py, where the decisions are made.
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_rules():
    """lnlm_ssm/_build.py, loaded by path: importing the package here would need it built."""
    path = os.path.join(ROOT, "lnlm_ssm", "_build.py")
    spec = importlib.util.spec_from_file_location("_lnlm_ssm_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up there
    spec.loader.exec_module(module)
    return module


rules = _load_build_rules()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:
    sys.exit(
        f"lnlm_ssm: building needs torch, and it is not importable ({exc}).\n"
        "Install torch first, e.g. `pip install torch==2.13.0` on CPU machines (or the CUDA build you want), "
        "then install this package from the repository root with `pip install --no-build-isolation -e .`"
    )


def _sources(pattern):
    """Paths relative to the repository root (setuptools wants them relative), sorted."""
    return sorted(glob.glob(pattern, root_dir=ROOT, recursive=True))


def _find_nvcc():
    if cpp_extension.CUDA_HOME:
        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        if os.path.exists(nvcc):
            return nvcc
    return shutil.which("nvcc")


def _local_archs():
    """Compute capabilities of the visible GPUs, as "8.0" strings (none on a CPU build of torch)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return [f"{major}.{minor}" for major, minor in map(torch.cuda.get_device_capability, range(torch.cuda.device_count()))]


def _use_ninja():
    # A venv's ninja lives beside its python; put it on PATH for a venv that is not activated.
    bin_dir = os.path.dirname(sys.executable)
    if shutil.which("ninja", path=bin_dir) and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


env = dict(os.environ)
try:
    jobs = rules.max_jobs(env, os.cpu_count())
    cpu_sources = _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/**/*.cu")
    cuda = rules.decide_cuda_build(
        env,
        torch_cuda_version=torch.version.cuda,
        nvcc_path=_find_nvcc(),
        local_archs=_local_archs(),
        have_sources=bool(cuda_sources),
        torch_version=torch.__version__,
    )
    cxx_flags = rules.cxx_flags(env)
except rules.BuildConfigError as exc:
    sys.exit(f"lnlm_ssm: {exc}")
if not cpu_sources:
    sys.exit(f"lnlm_ssm: no C++ sources in {os.path.join(ROOT, 'csrc', 'cpu')}; is the checkout complete?")
os.environ["MAX_JOBS"] = str(jobs)  # read by torch's ninja build

ext_modules = [
    cpp_extension.CppExtension(
        name=rules.CPU_EXTENSION,
        sources=cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=rules.cxx_link_flags(),
    )
]
if cuda.build:
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda.arch_list  # torch turns it into -gencode flags
    ext_modules.append(
        cpp_extension.CUDAExtension(
            name=rules.CUDA_EXTENSION,
            sources=cuda_sources + _sources("csrc/cuda/**/*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc", "cuda")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": rules.nvcc_flags()},
        )
    )

SUMMARY = rules.summary(cuda, env)


class BuildExtension(cpp_extension.BuildExtension):
    def run(self):
        print(SUMMARY, file=sys.stderr, flush=True)
        super().run()


setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=_use_ninja())},
)
