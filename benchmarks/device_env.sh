# Sourced by the device scripts, from the repository root: the device machine has no network and
# another timm, so timm comes from the carried wheel (.whl/), and this checkout goes on PYTHONPATH.
export PYTHONUNBUFFERED=1
if compgen -G '.whl/*.whl' > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
