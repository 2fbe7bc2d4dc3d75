#!/usr/bin/env bash
# Refresh the chart libraries the console ships (src/mlpipe_console/static/), from the npm
# registry at the versions package-lock.json pins: the pages load them from the console itself,
# never from a CDN. Run from anywhere; commit the copied files with the lock.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
npm ci --no-audit --no-fund --ignore-scripts
static=src/mlpipe_console/static
mkdir -p "$static"
cp node_modules/vega/build/vega.min.js "$static/vega.min.js"
cp node_modules/vega-lite/build/vega-lite.min.js "$static/vega-lite.min.js"
cp node_modules/vega-embed/build/vega-embed.min.js "$static/vega-embed.min.js"
for pkg in vega vega-lite vega-embed; do
  printf '%s %s\n' "$pkg" "$(node -p "require('./node_modules/$pkg/package.json').version")"
done > "$static/VERSIONS"
cat "$static/VERSIONS"
