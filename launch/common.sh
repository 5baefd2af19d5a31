# Shared by the launch scripts (sourced): errors, argument checks and the dry-run switch.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

# die MESSAGE: one line on stderr, exit status 2 (a usage error).
die() {
  echo "error: $*" >&2
  exit 2
}

# value FLAG NEXT: the value following FLAG ("--name NAME"); dies when it is missing.
value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"
  printf '%s' "$2"
}

# check FLAG VALUE REGEX WHAT: dies unless VALUE matches REGEX (an empty VALUE means the flag is missing).
check() {
  [[ -n "$2" ]] || die "$1 is required (see --help)"
  [[ "$2" =~ $3 ]] || die "$1 $2: expected $4"
}

# run COMMAND...: runs it, or with --dry_run prints it as one shell-quoted line after "+ ".
run() {
  if ((DRY_RUN)); then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# quoted WORDS...: one shell-quoted string, for a command that runs through a remote shell or a batch script.
quoted() {
  local out
  printf -v out ' %q' "$@"
  printf '%s' "${out# }"
}

# parse ARGS...: the flags named in VALUE_FLAGS set the upper-case variable of their name ("--job_name x" sets
# JOB_NAME=x), those in SWITCHES set theirs to 1, --dry_run sets DRY_RUN, --help prints `usage`; the words after
# -- become COMMAND, which must not be empty.
parse() {
  local flag given
  COMMAND=()
  while (($#)); do
    flag="${1#--}"
    case "$1" in
      --dry_run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; COMMAND=("$@"); break ;;
      --*)
        if [[ " ${VALUE_FLAGS[*]} " == *" $flag "* ]]; then
          given="$(value "$@")"
          printf -v "${flag^^}" '%s' "$given"
          shift 2
        elif [[ " ${SWITCHES[*]} " == *" $flag "* ]]; then
          printf -v "${flag^^}" '%s' 1
          shift
        else
          die "unknown argument $1 (see --help)"
        fi ;;
      *) die "unknown argument $1 (see --help)" ;;
    esac
  done
  ((${#COMMAND[@]})) || die "no command to run: give it after -- (see --help)"
}
