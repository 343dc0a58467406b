# Sourced by the evaluators' eval_*.sh launchers: sets $root (the repository), $python ($PYTHON, else the
# repository's .venv, else python3) and puts the repository on PYTHONPATH.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
