"""native.py, the one boundary of our C code: its table of exports against the C, the libraries'
independence, warnings, and what a failed build says."""

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2engine import native

C_TYPES = {  # a C parameter's type -> the ctypes type that carries it
    "int": ctypes.c_int, "long": ctypes.c_long, "int64_t": ctypes.c_int64, "float": ctypes.c_float,
    "void": None,
}


def c_signature(source: str, name: str) -> native.Signature:
    """The result and parameter types of C function `name` as its definition in `source` gives them."""
    found = re.search(rf"^(?:const )?(\w+)\s*(\*?)\s*{name}\(([^)]*)\)\s*\{{", source, re.MULTILINE)
    assert found, f"{name} is not defined in the C sources"
    result = ctypes.c_void_p if found[2] else C_TYPES[found[1]]
    arguments = []
    for parameter in " ".join(found[3].split()).split(", "):
        words = parameter.replace("const ", "").split()
        arguments.append(ctypes.c_void_p if "*" in parameter else C_TYPES[words[0]])
    return result, tuple(arguments)


@pytest.mark.parametrize("library", [native.KERNELS, native.BPE], ids=lambda library: library.name)
def test_the_exports_table_matches_the_c(library):
    source = "\n".join(path.read_text() for path in library.sources + library.headers)
    for name, signature in library.exports.items():
        assert c_signature(source, name) == signature, name
    defined = set(re.findall(r"^(?:const )?\w+\s*\*?\s*(gpt2engine_\w+)\([^)]*\)\s*\{", source, re.MULTILINE))
    declared = set(re.findall(r"^\w+ (gpt2engine_\w+)\([^)]*\);", source, re.MULTILINE))  # across files
    assert defined - declared == set(library.exports)  # every function Python may call is in the table


@pytest.mark.slow
@pytest.mark.parametrize("library", [native.KERNELS, native.BPE], ids=lambda library: library.name)
def test_each_library_builds_without_a_warning(library, tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    done = subprocess.run([compiler, *native.flags_for(library), "-Wextra", "-Werror",
                           *map(str, library.sources), "-o", str(tmp_path / "library.so")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_the_tokenizers_library_stands_apart_from_the_kernels(tmp_path):
    # built and loaded with the kernels switched off, and without OpenMP's runtime
    code = ("from pathlib import Path\n"
            "from gpt2engine import native\n"
            "assert native.load(native.KERNELS) is None and native.load(native.BPE) is not None\n"
            "assert 'gomp' not in Path('/proc/self/maps').read_text()\n")
    env = {**os.environ, "GPT2ENGINE_KERNELS": "0", "GPT2ENGINE_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert [p.name.split("-")[0] for p in (tmp_path / "gpt2engine").glob("*.so")] == ["bpe"]


def test_a_failed_build_is_one_line_on_stderr_naming_the_log(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.c"
    broken.write_text("int gpt2engine_broken(void) { return undeclared; }\n")
    library = native.Library("broken", sources=(broken,), headers=(), flags=(), exports={},
                             fallback="nothing stands in")
    monkeypatch.setenv("GPT2ENGINE_CACHE", str(tmp_path / "cache"))
    assert native.load(library) is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "the broken library did not build" in lines[0]
    assert lines[0].endswith("; nothing stands in")
    log = Path(re.search(r"the compiler's log: (\S+)\)", lines[0])[1])
    assert "undeclared" in log.read_text()
