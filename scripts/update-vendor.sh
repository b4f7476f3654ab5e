#!/bin/sh
# Updates the web client's vendored libraries in app/web/static/vendor/ from the npm registry.
#
#   scripts/update-vendor.sh                 # the versions pinned below
#   MARKED=18.2.1 scripts/update-vendor.sh   # another version of one of them
#
# Each package is fetched with `npm pack` (the published tarball, no install scripts run) into
# a temporary directory, and only its browser ES-module build and its licence are copied.
# The `sourceMappingURL` comments are left out (the maps are not vendored). The page loads the
# files as they are: there is no build step. Review `git diff --stat` and run the browser tests
# (tests/web/test_browser.py) after an update.
set -eu

MARKED=${MARKED:-18.2.1}
DOMPURIFY=${DOMPURIFY:-3.5.0}
HIGHLIGHT=${HIGHLIGHT:-11.12.0}
# highlight.js grammars loaded by the page (render.js imports each of them)
LANGUAGES="bash c cpp css diff dockerfile go ini java javascript json markdown plaintext python
rust shell sql typescript xml yaml"

root=$(cd "$(dirname "$0")/.." && pwd)
vendor="$root/app/web/static/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch() {  # fetch NAME VERSION DIR: unpacks the package tarball into $work/DIR
    (cd "$work" && npm pack --silent "$1@$2" > "$3.name")
    mkdir -p "$work/$3"
    tar -xzf "$work/$(cat "$work/$3.name")" -C "$work/$3" --strip-components=1
}

copy() {  # copy SRC DEST: a script without its sourceMappingURL comment
    mkdir -p "$(dirname "$2")"
    grep -v '^//# sourceMappingURL=' "$1" > "$2"
}

fetch marked "$MARKED" marked
fetch dompurify "$DOMPURIFY" dompurify
fetch @highlightjs/cdn-assets "$HIGHLIGHT" highlight

rm -rf "$vendor"
mkdir -p "$vendor/marked" "$vendor/dompurify" "$vendor/highlight/languages"

copy "$work/marked/lib/marked.esm.js" "$vendor/marked/marked.esm.js"
cp "$work/marked/LICENSE"* "$vendor/marked/"

copy "$work/dompurify/dist/purify.es.mjs" "$vendor/dompurify/purify.es.js"
cp "$work/dompurify/LICENSE"* "$vendor/dompurify/"

copy "$work/highlight/es/core.min.js" "$vendor/highlight/core.min.js"
for language in $LANGUAGES; do
    copy "$work/highlight/es/languages/$language.min.js" \
         "$vendor/highlight/languages/$language.min.js"
done
cp "$work/highlight/styles/github.min.css" "$work/highlight/styles/github-dark.min.css" \
   "$vendor/highlight/"
cp "$work/highlight/LICENSE" "$vendor/highlight/LICENSE"

cat > "$vendor/README.md" <<NOTE
Third-party libraries of the web client, each with its licence. Do not edit these files:
\`scripts/update-vendor.sh\` replaces them from the npm registry.

| directory | npm package | version | licence |
|---|---|---|---|
| marked/ | marked | $MARKED | MIT |
| dompurify/ | dompurify | $DOMPURIFY | MPL-2.0 or Apache-2.0 |
| highlight/ | @highlightjs/cdn-assets (highlight.js core, $(echo $LANGUAGES | wc -w) grammars, GitHub themes) | $HIGHLIGHT | BSD-3-Clause |
NOTE

echo "vendored marked $MARKED, dompurify $DOMPURIFY, highlight.js $HIGHLIGHT into $vendor"
