# Shared by the scripts in this folder: messages prefixed with $PROG, and a failure that says
# what to do next. Source it after setting PROG.
log() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: WARNING: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: ERROR: %s\n' "$PROG" "$1" >&2
    shift
    local line
    for line in "$@"; do printf '%s:   %s\n' "$PROG" "$line" >&2; done
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
