// Small progressive enhancements; every page works without this file.
document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form.send-form")) {
    const textarea = form.querySelector("textarea[name=content]");
    const button = form.querySelector("button[type=submit]");
    form.addEventListener("submit", () => {
      // The model may take a few seconds: say so and prevent a double send.
      if (button) {
        button.disabled = true;
        button.textContent = form.dataset.sendingLabel || "Sending…";
      }
    });
    if (textarea) {
      textarea.addEventListener("keydown", (event) => {
        // Enter sends, Shift+Enter starts a new line, as in other chat apps.
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
          event.preventDefault();
          if (textarea.value.trim()) form.requestSubmit();
        }
      });
    }
  }
  const latest = document.getElementById("latest");
  if (latest && !location.hash) latest.scrollIntoView({ block: "end" });
});
