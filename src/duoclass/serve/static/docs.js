// Starts Swagger UI on /openapi.json. A file of its own, not an inline script, so that /docs runs under the
// same Content-Security-Policy as the page (scripts from this server only). Swagger UI's files come from the
// Python package that ships them (fastapi-offline); nothing is loaded from another host.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
