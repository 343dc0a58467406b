# Sourced by the evaluators' launchers (validation_*/eval_*.sh, scripts/eval_risk.sh) so that they all take
# their arguments and place their results the same way:
#
#   bash LAUNCHER MODEL INPUT... [OUT] [--option ...]
#
# OUT, the result file (or folder), is the first argument after the launcher's inputs that does not start
# with '-'; without it $OUT, else work_dirs/eval/<model file name>_<suffix> in the repository. A relative
# MODEL, INPUT or OUT is taken from the caller's working directory. Options go to the Python evaluator.
#
# Sets $root (the repository), $python ($PYTHON, else the repository's .venv, else python3), puts the
# repository on PYTHONPATH and defines launcher_usage and launcher_output.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# The launcher's leading comment block (its usage) on stderr; exit status 2.
launcher_usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0" >&2
    exit 2
}

# launcher_output MODEL SUFFIX [ARG ...]: $out is ARG when it is there and not an option ($out_given=1, so
# the caller shifts it away), else $OUT, else $root/work_dirs/eval/<MODEL file name>_SUFFIX ($out_given=0).
launcher_output() {
    if [[ $# -gt 2 && $3 != -* ]]; then
        out=$3
        out_given=1
    else
        out=${OUT:-$root/work_dirs/eval/$(basename "${1%.*}")_$2}
        out_given=0
    fi
}
