# Source from the repo root on the GPU machine:  source tests/gpu/device_site.sh
#
# Unpacks every .devsite/part*.tar.xz (made by tests/gpu/make_device_site.py) into /tmp/devsite once per part
# (a part already unpacked is skipped, so two calls can carry one part each; part0-train alone serves `launch run`
# on a synthetic atlas in one call), then exports PYTHONPATH: the carried
# packages, pandas 2 only if the machine's pandas is 3 or newer (tiledbsoma and anndata need pandas < 3), and the
# four source folders of this repo (nothing of ours is installed there). Ray's local cluster, its workers and the
# local MLflow server are child processes of the driver and inherit this environment.

DEVSITE_DIR=${DEVSITE_DIR:-/tmp/devsite}
mkdir -p "$DEVSITE_DIR"
for _part in .devsite/part*.tar.xz; do
    [ -e "$_part" ] || continue
    _mark="$DEVSITE_DIR/.$(basename "$_part").$(stat -c %s "$_part")"
    if [ ! -e "$_mark" ]; then
        echo "device_site: unpacking $_part ($(du -h "$_part" | cut -f1)) into $DEVSITE_DIR" >&2
        tar -xJf "$_part" -C "$DEVSITE_DIR" && touch "$_mark"
    fi
done
unset _part _mark
[ -d "$DEVSITE_DIR/site" ] || echo "device_site: $DEVSITE_DIR/site missing (carry a .devsite part)" >&2
[ -d "$DEVSITE_DIR/pandas2" ] || [ ! -e .devsite/part1.tar.xz ] ||
    echo "device_site: $DEVSITE_DIR/pandas2 missing (part1 did not unpack)" >&2

# Sourcing again gives the same PYTHONPATH: built on the one found the first time.
export DEVSITE_PYTHONPATH0="${DEVSITE_PYTHONPATH0-${PYTHONPATH:-}}"
_pp="$DEVSITE_DIR/site"
if [ -d "$DEVSITE_DIR/pandas2" ] &&
    ! env -u PYTHONPATH python3 -c 'import sys, pandas; sys.exit(int(pandas.__version__.split(".")[0]) >= 3)' 2>/dev/null; then
    _pp="$DEVSITE_DIR/pandas2:$_pp"
fi
export PYTHONPATH="$_pp:$PWD/kernels:$PWD/platform:$PWD/data_service:$PWD/launch${DEVSITE_PYTHONPATH0:+:$DEVSITE_PYTHONPATH0}"
unset _pp
echo "device_site: PYTHONPATH=$PYTHONPATH" >&2
