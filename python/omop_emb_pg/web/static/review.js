// Keyboard shortcuts of the review page (documented on the page) and of the search page.
// No framework, no build step: the server renders everything; this only moves between terms
// already on the page and submits their forms.
(function () {
  "use strict";

  function typing(el) {
    return el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable);
  }

  var review = document.getElementById("review");

  if (!review) {  // the search page: "/" focuses the box
    document.addEventListener("keydown", function (ev) {
      if (ev.key === "/" && !typing(document.activeElement)) {
        var q = document.getElementById("q");
        if (q) { ev.preventDefault(); q.focus(); q.select(); }
      }
    });
    return;
  }

  var rows = Array.prototype.slice.call(document.querySelectorAll("#queue tr.term"));
  var current = rows.findIndex(function (r) { return r.classList.contains("current"); });
  if (current < 0 && rows.length) current = 0;

  function panel() {
    return rows.length ? document.getElementById("panel-" + rows[current].dataset.term) : null;
  }

  function show(i) {
    if (!rows.length) return;
    i = Math.max(0, Math.min(rows.length - 1, i));
    rows[current].classList.remove("current");
    var old = panel();
    if (old) old.hidden = true;
    current = i;
    rows[current].classList.add("current");
    var p = panel();
    if (p) p.hidden = false;
    rows[current].scrollIntoView({ block: "nearest" });
    history.replaceState(null, "", "#term-" + rows[current].dataset.term);
  }

  function submit(status) {
    var p = panel();
    if (!p) return;
    var form = p.querySelector("form.decide");
    var button = form.querySelector('button[name="status"][value="' + status + '"]');
    form.requestSubmit(button);
  }

  function pick(n) {
    var p = panel();
    if (!p) return;
    var radios = p.querySelectorAll("tr.candidate:not(.searched) input[type=radio]");
    if (radios[n - 1]) { radios[n - 1].checked = true; radios[n - 1].focus(); radios[n - 1].blur(); }
  }

  // Enter in the comment box saves the comment (not an approval).
  document.querySelectorAll("input.comment-box").forEach(function (box) {
    box.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") {
        ev.preventDefault();
        var form = box.form;
        form.requestSubmit(form.querySelector('button[name="status"][value="comment"]'));
      }
    });
  });

  rows.forEach(function (r, i) {
    r.addEventListener("click", function (ev) {
      if (ev.target.tagName === "A") { ev.preventDefault(); }
      show(i);
    });
  });

  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (typing(document.activeElement)) {
      if (ev.key === "Escape") document.activeElement.blur();
      return;
    }
    var p = panel();
    switch (ev.key) {
      case "j": case "ArrowDown": show(current + 1); break;
      case "k": case "ArrowUp": show(current - 1); break;
      case "a": submit("approved"); break;
      case "f": submit("flagged"); break;
      case "u": submit("unmapped"); break;
      case "i": submit("ignored"); break;
      case "c": if (p) p.querySelector("input.comment-box").focus(); break;
      case "s": if (p) { var b = p.querySelector("input.search-box"); b.focus(); b.select(); } break;
      case "n": if (review.dataset.nextPage) location.href = review.dataset.nextPage; break;
      case "p": if (review.dataset.prevPage) location.href = review.dataset.prevPage; break;
      case "/": location.href = "/search"; break;
      default:
        if (/^[1-9]$/.test(ev.key)) { pick(parseInt(ev.key, 10)); break; }
        return;
    }
    ev.preventDefault();
  });

  // A link to #term-N (after a decision) selects that term.
  var m = /^#term-(\d+)$/.exec(location.hash);
  if (m) {
    var j = rows.findIndex(function (r) { return r.dataset.term === m[1]; });
    if (j >= 0) show(j);
  }
})();
