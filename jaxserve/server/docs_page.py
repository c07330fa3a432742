"""`/docs`: a self-contained page that renders `/openapi.json` (no CDN, no external script or style).

Every route with its summary, parameters and request / response schemas; nothing is fetched but the spec.
"""

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxserve API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em;color:#222}
h1{font-size:1.5em} .op{border:1px solid #ccc;border-radius:6px;margin:.6em 0}
summary{cursor:pointer;padding:.5em .8em} .m{display:inline-block;width:4.5em;font-weight:600;font-family:monospace}
.get{color:#0a6} .post{color:#06c} pre{background:#f6f6f6;padding:.6em;overflow:auto;margin:.4em .8em .8em}
</style></head>
<body><h1 id="title">API</h1><p id="desc"></p><div id="ops">Loading /openapi.json ...</div>
<script>
function resolve(spec, node) {
  if (node && typeof node === "object") {
    if (node.$ref) { return resolve(spec, node.$ref.split("/").slice(1).reduce((o, k) => o[k], spec)); }
    const out = Array.isArray(node) ? [] : {};
    for (const k in node) { out[k] = resolve(spec, node[k]); }
    return out;
  }
  return node;
}
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
fetch("openapi.json").then(r => r.json()).then(spec => {
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  document.getElementById("desc").textContent = spec.info.description || "";
  const ops = document.getElementById("ops"); ops.textContent = "";
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const d = el("details", "op"), s = el("summary");
      s.append(el("span", "m " + method, method.toUpperCase()), el("code", "", path), " " + (op.summary || ""));
      d.append(s);
      const body = {};
      if (op.parameters) body.parameters = op.parameters;
      if (op.requestBody) body.requestBody = op.requestBody;
      body.responses = op.responses;
      d.append(el("pre", "", JSON.stringify(resolve(spec, body), null, 2)));
      ops.append(d);
    }
  }
}).catch(e => { document.getElementById("ops").textContent = "could not load /openapi.json: " + e; });
</script></body></html>
"""
