# Shared by fetch-smollm2.sh and fetch-gemma3.sh (sourced, not run): the parts of fetching a
# model that do not depend on the model. Each script sets its pins, then
#     fetch_begin NAME DEFAULT_DIR_NAME "${1:-}"   # exits at once, printing DEST, if it is done
#     ... download into "$work", convert into "$staging" with "$py" ...
#     fetch_finish                                 # stamps .complete, renames into DEST
#
# Guarantees: one fetch at a time per models directory (flock); DEST is assembled in
# DEST.tmp-XXXXXX and renamed into place, so an interrupted run never leaves a half-written
# DEST; only DEST is printed on stdout, progress goes to stderr; the converter's Python
# environment (VENV_REQS) is cached in $models/.venv.

fetch_begin() {  # name default-dir-name [dest]
    fetch_name=$1
    models=${TUNE_MODELS:-$HOME/.cache/tune/models}
    dest=$(realpath -m "${3:-$models/$2}")
    if fetch_is_complete "$dest"; then
        echo "$dest"
        exit 0
    fi
    command -v python3 >/dev/null || die "python3 not found"
    mkdir -p "$models" "$(dirname "$dest")"

    # One fetch at a time per models directory (another run may be building the same DEST,
    # or the shared converter venv).
    if command -v flock >/dev/null; then
        exec 9>"$models/.fetch.lock"
        flock 9
        if fetch_is_complete "$dest"; then
            echo "$dest"
            exit 0
        fi
        # Holding the lock, any DEST.tmp-* / DEST.old-* left by a killed run is stale.
        for stale in "$dest".tmp-?????? "$dest".old-??????; do
            [ -d "$stale" ] && { say "removing stale $stale"; rm -rf "$stale"; }
        done
    fi

    start=$SECONDS
    work=""
    staging=""
    trap fetch_cleanup EXIT
    trap 'exit 130' INT TERM

    # The converter environment, cached and shared by every fetch script.
    local venv=$models/.venv
    local venv_tag
    venv_tag="python=$(python3 -c 'import sys; print(sys.version.split()[0])') ${VENV_REQS[*]}"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.tune-ready" 2>/dev/null)" != "$venv_tag" ]; then
        say "creating converter venv in $venv"
        rm -rf "$venv"
        python3 -m venv "$venv" >&2 || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input "${VENV_REQS[@]}" >&2 \
            || die "pip install ${VENV_REQS[*]} failed"
        printf '%s' "$venv_tag" > "$venv/.tune-ready"
    else
        say "reusing converter venv $venv"
    fi
    py=$venv/bin/python
    work=$(mktemp -d "${TMPDIR:-/tmp}/fetch-$fetch_name.XXXXXX")
    staging=$(mktemp -d "$dest.tmp-XXXXXX")
    chmod 755 "$staging"
}

say() { printf 'fetch-%s: %s\n' "${fetch_name:-model}" "$*" >&2; }
die() { say "error: $*"; exit 1; }

fetch_is_complete() { [ -f "$1/.complete" ] && [ -f "$1/model.safetensors" ]; }

fetch_cleanup() {
    [ -n "$work" ] && rm -rf "$work"
    [ -n "$staging" ] && rm -rf "$staging"
    return 0
}

check_sha() {  # file expected-sha256
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [ "$got" = "$2" ] || die "$(basename "$1") has sha256 $got, expected $2"
}

fetch_finish() {
    chmod 644 "$staging"/*
    date -u +%Y-%m-%dT%H:%M:%SZ > "$staging/.complete"
    sync -f "$staging/model.safetensors" 2>/dev/null || true
    if [ -e "$dest" ]; then
        # An unfinished DEST (no .complete) from some earlier attempt: move it aside first,
        # since rename(2) will not replace a non-empty directory.
        say "replacing incomplete $dest"
        local old
        old=$(mktemp -d "$dest.old-XXXXXX")
        mv "$dest" "$old/"
        mv "$staging" "$dest"
        rm -rf "$old"
    else
        mv -T "$staging" "$dest"
    fi
    staging=""
    say "done in $((SECONDS - start))s"
    echo "$dest"
}
