// The search page's snippets are cut from the pages' HTML, where math is TeX between \( \) and
// \[ \]. Drop a formula that the cut left open at either end, then typeset the snippet with the
// site's MathJax (loaded on this page by docs/conf.py), queued on MathJax.startup.promise.
document.addEventListener("DOMContentLoaded", () => {
  if (typeof Search === "undefined") return;
  const makeSearchSummary = Search.makeSearchSummary;
  const OPEN = /\\\(|\\\[/g;
  const CLOSE = /\\\)|\\\]/g;
  const positions = (text, pattern) => [...text.matchAll(pattern)].map((m) => m.index);
  Search.makeSearchSummary = (htmlText, keywords, anchor) => {
    const summary = makeSearchSummary(htmlText, keywords, anchor);
    if (!summary) return summary;
    let text = summary.textContent;
    const firstClose = positions(text, CLOSE)[0];
    const firstOpen = positions(text, OPEN)[0];
    if (firstClose !== undefined && (firstOpen === undefined || firstClose < firstOpen))
      text = "..." + text.slice(firstClose + 2);
    const lastOpen = positions(text, OPEN).pop();
    const lastClose = positions(text, CLOSE).pop();
    if (lastOpen !== undefined && (lastClose === undefined || lastOpen > lastClose))
      text = text.slice(0, lastOpen) + "...";
    summary.textContent = text;
    if (window.MathJax && MathJax.startup && MathJax.startup.promise)
      MathJax.startup.promise = MathJax.startup.promise.then(() => MathJax.typesetPromise([summary]));
    return summary;
  };
});
