#!/bin/sh
# Fetches the web page's JavaScript dependencies once, from the npm
# registry, at exact versions, and copies their release files and licences
# into web/vendor/. The result is committed: the build needs no network.
# Run again only to change a version (then review the diff). Needs npm
# (Debian: apt-get install npm); the build and the tests do not.
set -eu
CYTOSCAPE=3.35.0
XTERM=6.0.0
ADDON_FIT=0.11.0

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/web/vendor"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
npm pack --silent "cytoscape@$CYTOSCAPE" "@xterm/xterm@$XTERM" "@xterm/addon-fit@$ADDON_FIT" >/dev/null
for t in *.tgz; do
    mkdir "${t%.tgz}"
    tar -xzf "$t" -C "${t%.tgz}"
done

rm -rf "$out"
mkdir -p "$out"
c="cytoscape-$CYTOSCAPE/package"
x="xterm-xterm-$XTERM/package"
f="xterm-addon-fit-$ADDON_FIT/package"
cp "$c/dist/cytoscape.min.js" "$out/cytoscape.min.js"
cp "$c/LICENSE" "$out/LICENSE.cytoscape"
cp "$x/lib/xterm.js" "$out/xterm.js"
cp "$x/css/xterm.css" "$out/xterm.css"
cp "$x/LICENSE" "$out/LICENSE.xterm"
cp "$f/lib/addon-fit.js" "$out/addon-fit.js"
cp "$f/LICENSE" "$out/LICENSE.addon-fit"
cat > "$out/VERSIONS" <<V
cytoscape $CYTOSCAPE (npm: cytoscape, dist/cytoscape.min.js)
@xterm/xterm $XTERM (npm: @xterm/xterm, lib/xterm.js, css/xterm.css)
@xterm/addon-fit $ADDON_FIT (npm: @xterm/addon-fit, lib/addon-fit.js)
V
(cd "$out" && sha256sum cytoscape.min.js xterm.js xterm.css addon-fit.js > SHA256SUMS)
ls -l "$out"
