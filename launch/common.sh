# Sourced by the launchers: where the project is, which Python, and the CPU thread default.
#   MEGATRON_EXT_HOME  the project checkout (default: the directory above launch/)
#   PYTHON             the interpreter (default: $MEGATRON_EXT_HOME/.venv/bin/python)
#   ENTRY              the Python module every rank runs (default: megatron_ext.train)
#   CONFIG             the run YAML (default: configs/run/tiny.yaml of the checkout); a relative
#                      path is taken from the directory the launcher was started in
#   OMP_NUM_THREADS    threads per rank (default 1: ranks are processes; more oversubscribes)
MEGATRON_EXT_HOME=${MEGATRON_EXT_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-$MEGATRON_EXT_HOME/.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
  echo "launch: no Python at $PYTHON; run $MEGATRON_EXT_HOME/launch/setup_env.sh or set PYTHON" >&2
  exit 2
fi
ENTRY=${ENTRY:-megatron_ext.train}
CONFIG=${CONFIG:-$MEGATRON_EXT_HOME/configs/run/tiny.yaml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$MEGATRON_EXT_HOME${PYTHONPATH:+:$PYTHONPATH}"
