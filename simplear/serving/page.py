"""The web page: a prompt box and the images, talking to the API."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING

from simplear.serving.config import request_defaults

if TYPE_CHECKING:
    from simplear.sampling.spec import SamplingSpec
    from simplear.serving.config import ServeConfig


STYLE = """
 body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 form { display: grid; grid-template-columns: repeat(4, 1fr); gap: .5rem 1rem; align-items: end; }
 label { display: flex; flex-direction: column; font-size: .85rem; gap: .2rem; }
 #prompt-label { grid-column: 1 / -1; }
 [hidden] { display: none !important; }
 textarea { font: inherit; min-height: 3.5rem; }
 button { grid-column: 1 / -1; padding: .6rem; font-size: 1rem; cursor: pointer; }
 #status { min-height: 1.5rem; margin: 1rem 0; }
 #status.error { color: #b00020; }
 #images { display: flex; flex-wrap: wrap; gap: 1rem; }
 #images figure { margin: 0; }
 #images img { width: 256px; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
 #images figcaption { font-size: .75rem; color: #666; }
"""

SCRIPT = """
const CONFIG = __CONFIG__;
const $ = (id) => document.getElementById(id);
$("engine").textContent = CONFIG.engine;
$("n").max = CONFIG.max_n;
$("prompt").maxLength = CONFIG.max_prompt_chars;
for (const s of CONFIG.sizes) {
  const o = document.createElement("option"); o.value = o.textContent = s; $("size").appendChild(o);
}
$("guidance_scale").value = CONFIG.defaults.guidance_scale;
$("temperature").value = CONFIG.defaults.temperature;
$("negative_prompt").placeholder = CONFIG.defaults.negative_prompt || "(empty)";
$("key-label").hidden = !CONFIG.auth;
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = { prompt: $("prompt").value, n: Number($("n").value), size: $("size").value };
  for (const k of ["guidance_scale", "temperature", "top_p"]) if ($(k).value !== "") body[k] = Number($(k).value);
  for (const k of ["seed", "top_k"]) if ($(k).value !== "") body[k] = parseInt($(k).value, 10);
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  const status = $("status");
  status.className = ""; status.textContent = "Generating…"; $("generate").disabled = true;
  const t0 = performance.now();
  try {
    const headers = { "Content-Type": "application/json" };
    if ($("api_key").value) headers.Authorization = "Bearer " + $("api_key").value;  // kept in the field only
    const r = await fetch(CONFIG.api, { method: "POST", headers, body: JSON.stringify(body) });
    const text = await r.text();
    let j = null;
    try { j = JSON.parse(text); } catch (e) { /* not ours: e.g. a proxy's plain-text error */ }
    if (!r.ok) throw new Error(r.status + " " + (j && j.error ? j.error.message : text || r.statusText));
    $("images").replaceChildren(...j.data.map((d) => {
      const fig = document.createElement("figure"), img = new Image(), cap = document.createElement("figcaption");
      img.src = "data:image/png;base64," + d.b64_json; img.alt = body.prompt; img.className = "result";
      cap.textContent = "seed " + d.seed; fig.append(img, cap); return fig;
    }));
    status.textContent = j.data.length + " image(s) in " + ((performance.now() - t0) / 1000).toFixed(1) + " s";
  } catch (e) {
    status.className = "error"; status.textContent = "Error: " + e.message;
  } finally { $("generate").disabled = false; }
});
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SimpleAR</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>__STYLE__</style></head>
<body>
<h1>SimpleAR</h1>
<p>Text-to-image with an autoregressive transformer over visual tokens. Engine: <b id="engine"></b>.</p>
<form id="form">
 <label id="prompt-label">Prompt
  <textarea id="prompt" name="prompt" required placeholder="a red circle on a blue background"></textarea></label>
 <label>Images <input id="n" type="number" min="1" value="1"></label>
 <label>Size <select id="size"></select></label>
 <label>Guidance scale <input id="guidance_scale" type="number" step="0.1" min="0"></label>
 <label>Seed <input id="seed" type="number" min="0" placeholder="random"></label>
 <label>Temperature <input id="temperature" type="number" step="0.05" min="0"></label>
 <label>Top-k <input id="top_k" type="number" min="1" placeholder="off"></label>
 <label>Top-p <input id="top_p" type="number" step="0.01" min="0" max="1" placeholder="off"></label>
 <label>Negative prompt <input id="negative_prompt" type="text" placeholder="(empty)"></label>
 <label id="key-label" hidden>API key
  <input id="api_key" type="password" autocomplete="off" placeholder="sent as Bearer"></label>
 <button id="generate" type="submit">Generate</button>
</form>
<div id="status" role="status"></div>
<div id="images"></div>
<script>__SCRIPT__</script>
</body></html>
"""


def _hash_source(text: str) -> str:
    """A CSP source that allows an inline element with exactly this text."""
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def render_page(cfg: ServeConfig, defaults: SamplingSpec, api_root: str = "", auth: bool = False) -> tuple[str, dict[str, str]]:
    """The page and its headers; `auth`: the API wants a key, so the page shows a field for it. The headers let a
    browser run only the page's own script and style (by hash), fetch only from this origin and show the page in
    no frame: an injected script, or a site that frames the page over its key field, gets nowhere."""
    config = {
        "auth": auth,
        "api": f"{api_root}/v1/images/generations",
        "engine": cfg.engine if not cfg.sjd_window else
        f"torch + speculative Jacobi decoding (window {cfg.sjd_window})",
        "sizes": cfg.sizes,
        "defaults": request_defaults(defaults),
        "max_n": cfg.max_n,
        "max_prompt_chars": cfg.max_prompt_chars,
    }
    # "</" cannot end the script element early once escaped
    script = SCRIPT.replace("__CONFIG__", json.dumps(config).replace("</", "<\\/"))
    policy = (f"default-src 'none'; script-src {_hash_source(script)}; style-src {_hash_source(STYLE)}; "
              "img-src data:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
    headers = {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"}
    return PAGE.replace("__STYLE__", STYLE).replace("__SCRIPT__", script), headers
