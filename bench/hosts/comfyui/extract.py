"""Extract one commit of a (possibly incomplete) bare git dir into a folder, tolerating missing blobs.

usage: python extract.py GIT_DIR COMMIT OUT MISSING_TXT [--check]
Writes every blob of COMMIT's tree under OUT (modes 100755 and symlinks kept); blobs the git dir lacks
are skipped and listed, one path a line, in MISSING_TXT. --check: write nothing under OUT, only the list.
"""
import os
import subprocess
import sys

git_dir, commit, out, missing_txt = sys.argv[1:5]
check = "--check" in sys.argv[5:]
tree = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "-r", "-z", commit],
                      capture_output=True, check=True).stdout.split(b"\0")
entries = []
for rec in tree:
    if not rec:
        continue
    meta, path = rec.split(b"\t", 1)
    mode, typ, sha = meta.decode().split()
    if typ == "blob":  # submodules ("commit") are skipped
        entries.append((mode, sha, path.decode()))
cat = subprocess.Popen(["git", "--git-dir", git_dir, "cat-file", "--batch-check" if check else "--batch"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
missing, written = [], 0
for mode, sha, path in entries:
    cat.stdin.write(sha.encode() + b"\n")
    cat.stdin.flush()
    header = cat.stdout.readline().decode().split()
    if len(header) < 2 or header[1] == "missing":
        missing.append(path)
        continue
    if check:
        continue
    data = cat.stdout.read(int(header[2]))
    cat.stdout.read(1)  # trailing LF
    p = os.path.join(out, path)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if mode == "120000":
        os.symlink(data.decode(), p)
    else:
        with open(p, "wb") as f:
            f.write(data)
        if mode == "100755":
            os.chmod(p, 0o755)
    written += 1
cat.stdin.close()
cat.wait()
with open(missing_txt, "w") as f:
    f.writelines(m + "\n" for m in missing)
print(f"{len(entries)} blobs in {commit[:10]}: {written} written, {len(missing)} missing {missing}")
