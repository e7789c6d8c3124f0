"""Our top-level `kernels` package must not look like the Hugging Face hub package `kernels`."""

import subprocess
import sys


def test_transformers_does_not_see_hub_kernels():
    code = (
        "import kernels, transformers\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert hasattr(kernels, 'grpo_loss'), 'this must be the videor1 kernels package'\n"
        "print(is_kernels_available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_kernels_imports_nothing_from_videor1():
    code = "import sys, kernels\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('videor1', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
