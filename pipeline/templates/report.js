"use strict";
// The per-concept table: sort by a column (click its header), filter by name and status. Sorting uses
// each cell's data-sort (the full-precision number; empty where there is none, always listed last).
(function () {
  var table = document.getElementById("concepts");
  if (!table) {
    return;
  }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var headers = Array.prototype.slice.call(table.querySelectorAll("thead th[data-col]"));
  var search = document.getElementById("concept-filter");
  var status = document.getElementById("status-filter");
  var shown = document.getElementById("concepts-shown");

  function sortKey(row, column, numeric) {
    var cell = row.cells[column];
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    if (!numeric) {
      return raw.toLowerCase();
    }
    return raw === "" ? null : parseFloat(raw);
  }

  function sortBy(header) {
    var column = parseInt(header.getAttribute("data-col"), 10);
    var numeric = header.getAttribute("data-type") === "number";
    var current = header.getAttribute("aria-sort");
    var direction = current ? (current === "ascending" ? "descending" : "ascending")
                            : (numeric ? "descending" : "ascending");
    headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", direction);
    var sign = direction === "ascending" ? 1 : -1;
    var keyed = rows.map(function (row, index) {
      return {row: row, key: sortKey(row, column, numeric), index: index};
    });
    keyed.sort(function (a, b) {
      if (a.key === null || b.key === null) {
        if (a.key === b.key) {
          return a.index - b.index;
        }
        return a.key === null ? 1 : -1;
      }
      if (a.key < b.key) {
        return -sign;
      }
      if (a.key > b.key) {
        return sign;
      }
      return a.index - b.index;
    });
    var fragment = document.createDocumentFragment();
    keyed.forEach(function (item) { fragment.appendChild(item.row); });
    body.appendChild(fragment);
  }

  function applyFilter() {
    var text = search.value.trim().toLowerCase();
    var wanted = status.value;
    var visible = 0;
    rows.forEach(function (row) {
      var show = (text === "" || row.getAttribute("data-concept").toLowerCase().indexOf(text) !== -1) &&
                 (wanted === "all" || row.getAttribute("data-status") === wanted);
      row.hidden = !show;
      if (show) {
        visible += 1;
      }
    });
    shown.textContent = visible + " of " + rows.length;
  }

  headers.forEach(function (header) {
    header.querySelector("button").addEventListener("click", function () { sortBy(header); });
  });
  search.addEventListener("input", applyFilter);
  status.addEventListener("change", applyFilter);
  applyFilter();
}());
