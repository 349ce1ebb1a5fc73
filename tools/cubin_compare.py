#!/usr/bin/env python3
"""Whether a change leaves CUDA kernels' machine code as it was, without a GPU.

A kernel whose SASS is byte for byte the same runs the same: a refactor, a comment or a compile-time check that
proves so needs no device time to show it costs nothing. For each .cu file named, this compiles the working tree's
file and the base revision's (a temporary git worktree) with the build's own command (compile_commands.json of a
CMake build with MOEX_CUDA=ON), as a cubin for the build's GPU (one -arch, no -lineinfo: line tables move with
every edited line), and compares each kernel's .text section (readelf).

Usage: tools/cubin_compare.py [--build build/cuda-dev] [--base HEAD] [--json] [FILE.cu|FILE.cuh ...]
(a header stands for every .cu file of the build that includes it; no file: those changed since the base)
Exit status: 0 every kernel the same, 1 some kernel differs (or exists on one side only), 2 an error (a file
not in the build, a failed compile, no readelf).
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile


def fail(message):
    print(f"cubin_compare.py: {message}", file=sys.stderr)
    sys.exit(2)


def cubin_command(command, out):
    """The build's object command for `source`, made to write a cubin for one GPU without line tables."""
    args = shlex.split(command)
    result, skip = [], 0
    for i, arg in enumerate(args):
        if skip:
            skip -= 1
            continue
        if arg in ("-MF", "-MT", "-o"):
            skip = 1
            continue
        if arg in ("-MD", "-lineinfo", "-c"):
            continue
        match = re.fullmatch(r"--generate-code=arch=compute_(\w+),code=\[?[^\]]*\]?", arg)
        if match:
            result.append(f"-arch=sm_{match.group(1)}")
            continue
        result.append(arg)
    return result + ["-cubin", "-o", out]


def kernel_sections(cubin):
    """{kernel section name: machine code bytes} of a cubin."""
    listing = subprocess.run(["readelf", "-S", "-W", cubin], capture_output=True, text=True, check=True).stdout
    names = re.findall(r"\]\s+(\.text\.\S+)", listing)
    sections = {}
    for name in names:
        dump = subprocess.run(["readelf", "-x", name, cubin], capture_output=True, text=True, check=True).stdout
        data = bytearray()
        for line in dump.splitlines():
            words = re.match(r"\s+0x[0-9a-f]+ ((?:[0-9a-f]{8} ?){1,4})", line)
            if words:
                for word in words.group(1).split():
                    data += bytes.fromhex(word)
        # An anonymous namespace's mangled name carries a hash of the source's path, which differs between the
        # working tree and the base's worktree.
        sections[re.sub(r"_GLOBAL__N__[0-9a-f]+_", "_GLOBAL__N__", name[len(".text."):])] = bytes(data)
    return sections


def including_sources(root, header, sources):
    """The build's .cu files that include `header` (relative to root), directly or through other headers under
    src/ (quoted includes, resolved against src/ as the build's -I does)."""
    includes = {}
    for folder, _, files in os.walk(os.path.join(root, "src")):
        for f in files:
            path = os.path.join(folder, f)
            if f.endswith((".cu", ".cuh", ".h")):
                with open(path, errors="replace") as text:
                    includes[os.path.relpath(path, root)] = {
                        os.path.join("src", m) for m in re.findall(r'^\s*#include\s+"([^"]+)"', text.read(), re.M)}
    found, frontier = set(), {header}
    while frontier:
        frontier = {f for f, inc in includes.items() if inc & frontier} - found
        found |= frontier
    return sorted(f for f in found if f in sources)


def compile_cubin(entry, root, tree, rel, out):
    """Compiles tree/rel with entry's command, every path under root moved to tree."""
    command = entry["command"].replace(root, tree) if tree != root else entry["command"]
    args = cubin_command(command, out)
    done = subprocess.run(args, cwd=entry["directory"], capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"compiling {rel} ({'working tree' if tree == root else 'base'}) failed:\n{done.stderr[-2000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help=".cu files of the build, or headers (every .cu of the build that "
                        "includes one); default: the .cu and .cuh files changed since --base")
    parser.add_argument("--build", default="build/cuda-dev", help="CMake build directory with compile_commands.json")
    parser.add_argument("--base", default="HEAD", help="the git revision to compare against (default HEAD)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    args = parser.parse_args()

    if not shutil.which("readelf"):
        fail("readelf (binutils) is not on PATH")
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True).stdout.strip()
    if not root:
        fail("not inside a git repository")
    commands_path = os.path.join(root, args.build, "compile_commands.json")
    try:
        with open(commands_path) as f:
            entries = {os.path.realpath(e["file"]): e for e in json.load(f)}
    except (OSError, ValueError) as e:
        fail(f"cannot read {commands_path} ({e}): configure a CUDA build there first (tools/device_cuda.sh prepare)")
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}"], cwd=root,
                      capture_output=True).returncode != 0:
        fail(f"no such revision: {args.base}")

    sources = {os.path.relpath(path, root) for path in entries}
    names = args.files or subprocess.run(["git", "diff", "--name-only", args.base, "--", "*.cu", "*.cuh"], cwd=root,
                                         capture_output=True, text=True).stdout.split()
    if not names:
        fail(f"no .cu or .cuh file changed since {args.base}: name the files to compare")
    rels = []
    for name in names:
        rel = os.path.relpath(os.path.realpath(os.path.join(root, name) if not args.files else name), root)
        if rel in sources:
            rels.append(rel)
        elif rel.endswith((".cuh", ".h")) and os.path.exists(os.path.join(root, rel)):
            users = including_sources(root, rel, sources)
            if not users:
                fail(f"no .cu file of the build in {args.build} includes {name}")
            rels += users
        else:
            fail(f"{name} is not compiled by the build in {args.build}")
    rels = sorted(set(rels))

    report, differs = [], False
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", base_tree, args.base], cwd=root, check=True)
        try:
            for rel in rels:
                entry = entries[os.path.realpath(os.path.join(root, rel))]
                stem = rel.replace("/", "_")
                new, old = os.path.join(tmp, stem + ".new.cubin"), os.path.join(tmp, stem + ".base.cubin")
                compile_cubin(entry, root, root, rel, new)
                compile_cubin(entry, root, base_tree, rel, old)
                new_k, old_k = kernel_sections(new), kernel_sections(old)
                for kernel in sorted(set(new_k) | set(old_k)):
                    a, b = new_k.get(kernel), old_k.get(kernel)
                    if a is None or b is None:
                        state, changed = ("only in the base" if a is None else "only in the working tree"), None
                    else:
                        words = max(len(a), len(b)) // 16  # SASS instructions are 16 bytes on sm_70 and later
                        changed = sum(1 for i in range(words) if a[16 * i:16 * i + 16] != b[16 * i:16 * i + 16])
                        state = "same" if a == b else "differs"
                    differs = differs or state != "same"
                    report.append({"file": rel, "kernel": kernel, "state": state,
                                   "instructions": len(a or b) // 16, "instructions_changed": changed})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=root, capture_output=True)

    if args.json:
        print(json.dumps({"base": args.base, "same": not differs, "kernels": report}, indent=1))
    else:
        for r in report:
            if r["state"] != "same":
                extra = f", {r['instructions_changed']} of {r['instructions']} instructions" \
                    if r["instructions_changed"] is not None else ""
                print(f"{r['file']}: {r['kernel']}: {r['state']}{extra}")
        same = sum(1 for r in report if r["state"] == "same")
        print(f"{same} of {len(report)} kernels the same as {args.base}")
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
