// The API reference page (/docs). It reads the controller's own /openapi.json and draws
// each route: what it does, its parameters, the body it takes and what it answers.
// Everything comes from this controller: no script, style or font from anywhere else.
"use strict";

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
};

function resolve(spec, schema) {
  // "$ref": "#/components/schemas/Name" -> the schema it names (one level, enough to read)
  if (schema && schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return { name, schema: (spec.components?.schemas || {})[name] || {} };
  }
  return { name: null, schema: schema || {} };
}

function schemaBlock(spec, schema) {
  const { name, schema: plain } = resolve(spec, schema);
  const box = el("div");
  if (name) box.append(el("p", {}, "schema ", el("code", {}, name)));
  box.append(el("pre", { class: "schema" }, JSON.stringify(plain, null, 2)));
  return box;
}

function route(spec, path, method, op) {
  const summary = el("summary", {}, el("span", { class: `method ${method}` }, method.toUpperCase()), " ", path,
                     op.summary ? el("span", { class: "muted" }, ` — ${op.summary}`) : "");
  const details = el("details", { class: "route", id: op.operationId || `${method}-${path}` }, summary);
  if (op.description) details.append(el("p", {}, op.description));
  const params = op.parameters || [];
  if (params.length) {
    const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"),
                                     el("th", {}, "type"), el("th", {}, "required")));
    for (const p of params) {
      const type = resolve(spec, p.schema).schema;
      table.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in),
                      el("td", {}, type.type || (type.anyOf || []).map((t) => t.type).join(" or ") || ""),
                      el("td", {}, p.required ? "yes" : "no")));
    }
    details.append(table);
  }
  const body = op.requestBody?.content?.["application/json"]?.schema;
  if (body) details.append(el("h4", {}, "request body (JSON)"), schemaBlock(spec, body));
  for (const [status, answer] of Object.entries(op.responses || {})) {
    details.append(el("h4", {}, `${status} ${answer.description || ""}`));
    const schema = answer.content?.["application/json"]?.schema;
    if (schema) details.append(schemaBlock(spec, schema));
  }
  return details;
}

async function draw() {
  const main = document.getElementById("reference");
  try {
    const response = await fetch("/openapi.json");
    const spec = await response.json();
    main.replaceChildren(el("h2", {}, `${spec.info.title} ${spec.info.version}`),
                         el("p", {}, spec.info.description || ""));
    for (const [path, methods] of Object.entries(spec.paths || {})) {
      for (const [method, op] of Object.entries(methods)) main.append(route(spec, path, method, op));
    }
  } catch (error) {
    main.replaceChildren(el("p", {}, `cannot read /openapi.json: ${error}`));
  }
}

draw();
