#!/usr/bin/env bash
# What travels to the GPU machine (issue #25). The device tool sends the working tree (tracked files and
# untracked ones git does not ignore, plus the carried paths) and refuses one over 64 MiB. The repository's
# files are about 78 MiB, and the GPU machine also needs PyAV (tools/fetch-gpu-wheels.sh, about 24 MiB).
# So the run takes two calls, each with a tree the GPU run reads and no more:
#
#   tools/gpu-travel.sh wheels    # call 1's tree: without the I3D weights (24 MiB); carry tools/wheels and run
#                                 #   STEPS=install bash tools/gpu-check.sh  (PyAV installed there, kept while warm)
#   tools/gpu-travel.sh run       # call 2's tree, at once (the machine goes back after 30 s idle): everything
#                                 #   the run reads, no wheels; run  DEADLINE_S=N bash tools/gpu-check.sh  with N
#                                 #   the device time left (status: budget_left_s) less 40 s, at most 560
#   tools/gpu-travel.sh restore   # ALWAYS afterwards: every file back in the index
#   tools/gpu-travel.sh size      # what would travel now, in MiB
#
# A file is left out by taking it out of the index (`git rm --cached`, the file stays on disk) and ignoring
# it in .git/info/exclude; `restore` undoes both. Commit nothing in between: the commit would delete them.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=64
# worktrees share one exclude file: each block names its checkout, and restore takes only its own
TOP=$(pwd -P)
BEGIN="# gpu-travel begin ($TOP): tools/gpu-travel.sh restore there removes this block"
END="# gpu-travel end ($TOP)"
# what the GPU run never reads: the self-trained and spare weights, the third-party originals the converters' tests read
NOT_READ=(models/weights/detect-ssdlite320_mobilenet_v3_large.pt models/weights/flow-flownet_s_small.pt
          models/weights/segment-unet_small.pt models/weights/action-causal3d_small.pt
          models/weights/reid-embed_small.pt tests/data/originals)
I3D=(models/weights/action-i3d.pt)
EXCLUDE=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree: its info/ is elsewhere

travelling_bytes() {  # tracked, untracked and not ignored, and the carried folder when given
    local tree carried=0
    tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    if [ -n "${1:-}" ] && [ -e "$1" ]; then carried=$(du -sb "$1" | cut -f1); fi
    echo $(( tree + carried ))
}

restore() {
    local paths=()
    if [ -f "$EXCLUDE" ] && grep -qxF "$BEGIN" "$EXCLUDE"; then
        mapfile -t paths < <(awk -v b="$BEGIN" -v e="$END" '$0 == b {on = 1; next} $0 == e {on = 0; next}
                                                            on {print substr($0, 2)}' "$EXCLUDE")
        awk -v b="$BEGIN" -v e="$END" '$0 == b {on = 1; next} $0 == e {on = 0; next} !on' "$EXCLUDE" > "$EXCLUDE.tmp"
        mv "$EXCLUDE.tmp" "$EXCLUDE"
    fi
    if [ "${#paths[@]}" -gt 0 ]; then git reset -q -- "${paths[@]}"; fi
}

leave_out() {  # leave_out PATH...: out of the index and ignored, until restore
    restore
    if ! git diff --cached --quiet; then
        echo "gpu-travel: the index holds staged changes; commit or unstage them first" >&2
        exit 1
    fi
    # the block first: restore finds what to put back from it, so a failure after this leaves nothing unrecorded
    mkdir -p "$(dirname "$EXCLUDE")"
    { echo "$BEGIN"; printf '/%s\n' "$@"; echo "$END"; } >> "$EXCLUDE"
    git rm -r -q --cached -- "$@"
}

check() {  # check CARRIED: print the size; fail over the limit
    local bytes mib
    bytes=$(travelling_bytes "${1:-}")
    mib=$(( (bytes + 1048575) / 1048576 ))
    echo "gpu-travel: ${mib} MiB would travel${1:+ with $1} (limit ${LIMIT_MIB} MiB)"
    if [ "$mib" -gt "$LIMIT_MIB" ]; then
        echo "gpu-travel: over the device tool's limit; leave more out (NOT_READ in $0)" >&2
        return 1
    fi
}

case "${1:-}" in
    wheels)
        if [ ! -f tools/wheels/wheels.tar.xz ]; then
            echo "gpu-travel: no tools/wheels/wheels.tar.xz; run tools/fetch-gpu-wheels.sh first" >&2
            exit 1
        fi
        leave_out "${NOT_READ[@]}" "${I3D[@]}"
        check tools/wheels || { restore; exit 1; } ;;
    run)
        leave_out "${NOT_READ[@]}"
        check || { restore; exit 1; } ;;
    restore)
        restore
        if ! git diff --cached --quiet; then
            echo "gpu-travel: the index still differs from the last commit (git status); nothing of this script's is left to undo" >&2
            exit 1
        fi
        echo "gpu-travel: every file is back in the index" ;;
    size)
        check "${2:-}" ;;
    *)
        sed -n '2,16p' "$0" >&2
        exit 2 ;;
esac
