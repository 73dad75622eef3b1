# Sourced by the launchers that read a hostfile (DeepSpeed's and OpenMPI's format, launchers/hostfile.example):
# one "HOST slots=N" per line; blank lines and lines starting with # are skipped.

# check_hostfile FILE WHO: one line on stderr and exit 2 unless FILE lists at least one host, each once, N >= 1
check_hostfile() {
  local problem
  [[ -f "$1" ]] || { echo "$2: no hostfile at $1 (see launchers/hostfile.example)" >&2; exit 2; }
  problem=$(awk '
    { line = $0; sub(/^[ \t]+/, "", line); sub(/[ \t\r]+$/, "", line) }
    line == "" || line ~ /^#/ { next }
    line !~ /^[^ \t]+[ \t]+slots=[1-9][0-9]*([ \t].*)?$/ { bad = sprintf("line %d \"%s\" is not HOST slots=N (N >= 1)", NR, line); exit }
    { split(line, f, /[ \t]+/) }
    f[1] in seen { bad = sprintf("line %d lists host %s a second time", NR, f[1]); exit }
    { seen[f[1]] = 1; n++ }
    END { if (bad == "" && n == 0) bad = "lists no host"; printf "%s", bad }' "$1")
  [[ -z "$problem" ]] || { echo "$2: hostfile $1: $problem" >&2; exit 2; }
}

# hostfile_hosts FILE: the hosts, in order
hostfile_hosts() {
  awk '{ sub(/^[ \t]+/, "") } $0 != "" && $0 !~ /^#/ { print $1 }' "$1"
}
