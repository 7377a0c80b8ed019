# --- helpers (copied from launch/job_helpers.sh into every generated job script) ---
# LLMJP_DRY_RUN=1 (set by `llmjp-launch --dry-run`) prints what would run instead of running it.
DRY_RUN=${LLMJP_DRY_RUN:-}

step() {  # a preparation command: shown in a dry run, run otherwise
  if [ -n "$DRY_RUN" ]; then echo "+ $*"; else "$@"; fi
}

launch() {  # the final command: printed (quoted where needed) in a dry run, else it replaces
  # this shell
  if [ -n "$DRY_RUN" ]; then
    local line="" arg
    for arg in "$@"; do
      if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $arg"; else line+=" $(printf '%q' "$arg")"; fi
    done
    echo "${line# }"
  else
    exec "$@"
  fi
}

load_modules() {  # site environment modules (on ABCI 3.0, HPC-X provides mpirun)
  if ! command -v module >/dev/null 2>&1 && [ -f /etc/profile.d/modules.sh ]; then
    source /etc/profile.d/modules.sh
  fi
  module load "$@"
}

unique_hosts() {  # host names of a node file in order of first appearance (PBS repeats a
  # host once per MPI slot of its chunk)
  awk 'NF && $1 !~ /^#/ && !seen[$1]++ {print $1}' "$1"
}

check_hosts() {  # the allocation must have exactly the nodes the rank layout was checked for
  if [ "$1" -ne "$2" ]; then
    echo "llmjp job: the allocation has $1 hosts, the job was planned for $2" >&2
    exit 2
  fi
}

derive_port() {  # 20000-29999 from the job id: different jobs on one host get different ports,
  # and the range is below the kernel's ephemeral ports (32768+), which outgoing connections use
  local digits=${1%%.*}
  digits=${digits//[!0-9]/}
  echo $((20000 + 10#${digits:-0} % 10000))
}

write_hostfile() {  # FILE SLOTS HOST...: an OpenMPI hostfile, one line per node
  local file=$1 slots=$2
  shift 2
  if [ -n "$DRY_RUN" ]; then
    echo "+ write $file:"
    printf "    %s slots=$slots\n" "$@"
  else
    printf "%s slots=$slots\n" "$@" > "$file"
  fi
}

existing() {  # the paths among the arguments that exist on this node, comma-separated
  local out="" p
  for p in "$@"; do
    if [ -e "$p" ]; then out+="${out:+,}$p"; fi
  done
  echo "$out"
}
# --- end of helpers ---
