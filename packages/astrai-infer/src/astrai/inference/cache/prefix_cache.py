"""`PrefixCache`: which physical pages hold the KV of which exact token prefix.

A page of KV entries is only valid under the exact token prefix it was computed with: the same page of
tokens after a different history (or at another position) has different keys and values. So the index is a
tree keyed by whole pages of tokens (a radix tree at page granularity): the node for logical page `i` of a
sequence hangs under the node of its pages `0..i-1`, and the edge is labelled with the page's own tokens.
Lookup walks from the root with the exact tokens; dict lookups compare the token tuples, so there are no
hash collisions to worry about and a page is reused only under the same prefix at the same position.

Each node owns one physical page. When a page is evicted its node goes, and with it every descendant
(their prefix is no longer complete); `evict` returns those orphaned pages so the pool can reclaim them.
"""

from __future__ import annotations

from collections.abc import Sequence


class _Node:
    """One cached page: `tokens` (its page of token ids) under `parent`, children keyed by their tokens."""

    __slots__ = ("children", "page", "parent", "tokens")

    def __init__(self, page: int, tokens: tuple[int, ...], parent: _Node | None):
        self.page = page
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}


class PrefixCache:
    """Exact-prefix index from full pages of tokens to the physical pages holding their KV."""

    def __init__(self, page_size: int):
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size={page_size!r}: must be a positive integer")
        self._page_size = page_size
        self._root = _Node(-1, (), None)  # sentinel: the empty prefix
        self._nodes: dict[int, _Node] = {}  # physical page -> its node

    @property
    def page_size(self) -> int:
        return self._page_size

    def __len__(self) -> int:
        return len(self._nodes)

    def has_page(self, idx: int) -> bool:
        return idx in self._nodes

    def lookup(self, token_ids: Sequence[int]) -> list[int]:
        """Physical pages holding logical pages 0, 1, ... of `token_ids`, up to the first miss.

        Only full pages can match; a trailing partial page never does.
        """
        pages = []
        node = self._root
        for tokens in self._full_pages(token_ids):
            node = node.children.get(tokens)
            if node is None:
                break
            pages.append(node.page)
        return pages

    def record(self, page_idx: int, token_ids: Sequence[int], logical_page_idx: int) -> bool:
        """Register `page_idx` as holding logical page `logical_page_idx` of `token_ids`.

        Returns True if the page is now indexed. Nothing is recorded (False) when a page before it is not
        cached (the prefix would be incomplete) or when another page already holds this exact prefix.
        Recording the page already indexed under this prefix is a no-op that returns True.
        """
        ps = self._page_size
        if logical_page_idx < 0 or (logical_page_idx + 1) * ps > len(token_ids):
            raise ValueError(
                f"logical_page_idx={logical_page_idx}: not a full page of {len(token_ids)} tokens (page_size={ps})"
            )
        parent = self._root
        for tokens in self._full_pages(token_ids[: logical_page_idx * ps]):
            parent = parent.children.get(tokens)
            if parent is None:
                return False
        tokens = tuple(token_ids[logical_page_idx * ps : (logical_page_idx + 1) * ps])
        return self._attach(parent, tokens, page_idx).page == page_idx

    def record_pages(self, pages: Sequence[int], token_ids: Sequence[int], start_logical_page: int = 0) -> int:
        """Index `pages[i]` as logical page i of `token_ids` for every full page from `start_logical_page` on,
        in one walk down the tree; returns how many of `pages` are indexed afterwards.

        Where another page already holds a prefix, the walk continues through that page (the KV content of a
        prefix does not depend on which physical page holds it). Pages before `start_logical_page` are only
        followed; if one of them is not cached, nothing after it can be indexed.
        """
        node = self._root
        indexed = 0
        for logical, tokens in enumerate(self._full_pages(token_ids)):
            if logical >= len(pages):
                break
            child = node.children.get(tokens)
            if child is None:
                if logical < start_logical_page:
                    break
                child = self._attach(node, tokens, pages[logical])
            indexed += child.page == pages[logical]
            node = child
        return indexed

    def evict(self, page_idx: int) -> list[int]:
        """Forget `page_idx` and every page cached below it; returns the descendants' pages (now orphans)."""
        node = self._nodes.get(page_idx)
        if node is None:
            return []
        del node.parent.children[node.tokens]
        orphans = []
        stack = list(node.children.values())
        del self._nodes[page_idx]
        while stack:
            child = stack.pop()
            del self._nodes[child.page]
            orphans.append(child.page)
            stack.extend(child.children.values())
        return orphans

    def clear(self) -> list[int]:
        """Forget every indexed prefix; returns the pages that were indexed."""
        pages = list(self._nodes)
        self._root.children.clear()
        self._nodes.clear()
        return pages

    def check_invariants(self) -> None:
        """Raise AssertionError unless the tree and the page index describe the same nodes."""
        seen = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            for tokens, child in node.children.items():
                if child.parent is not node or child.tokens != tokens or len(tokens) != self._page_size:
                    raise AssertionError(f"prefix tree node for page {child.page} is mislinked")
                if self._nodes.get(child.page) is not child:
                    raise AssertionError(f"page {child.page} is in the tree but not in the page index")
                seen += 1
                stack.append(child)
        if seen != len(self._nodes):
            raise AssertionError(f"page index holds {len(self._nodes)} pages, tree holds {seen}")

    def _attach(self, parent: _Node, tokens: tuple[int, ...], page_idx: int) -> _Node:
        # The node for `tokens` under `parent`: the existing one, else a new one owning `page_idx`.
        existing = parent.children.get(tokens)
        if existing is not None:
            return existing
        if page_idx in self._nodes:
            # A page holds one prefix; its content must be evicted before it is rewritten.
            raise RuntimeError(f"page {page_idx} is already cached under another prefix")
        node = _Node(page_idx, tokens, parent)
        parent.children[tokens] = node
        self._nodes[page_idx] = node
        return node

    def _full_pages(self, token_ids: Sequence[int]):
        ps = self._page_size
        for start in range(0, len(token_ids) - ps + 1, ps):
            yield tuple(token_ids[start : start + ps])
