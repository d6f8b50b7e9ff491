// Applies queued items once per animation frame, so a burst of events costs one DOM update per frame.

export class FrameBatch<T> {
  private queue: T[] = [];
  private scheduled = false;
  private appliedCount = 0;

  /**
   * @param apply updates the DOM for a whole batch, in arrival order
   * @param counter element whose text (and data-count) is the number of items applied so far
   */
  constructor(
    private readonly apply: (items: T[]) => void,
    private readonly counter?: HTMLElement,
  ) {}

  /** Number of items applied so far. */
  get applied(): number {
    return this.appliedCount;
  }

  push(item: T): void {
    this.queue.push(item);
    if (this.scheduled) return;
    this.scheduled = true;
    // Hidden tabs get no animation frames; a timer keeps the queue bounded there.
    if (document.hidden) setTimeout(() => this.flush(), 100);
    else requestAnimationFrame(() => this.flush());
  }

  private flush(): void {
    this.scheduled = false;
    const items = this.queue;
    if (items.length === 0) return;
    this.queue = [];
    try {
      this.apply(items);
    } finally {
      this.appliedCount += items.length;
      if (this.counter) {
        this.counter.textContent = String(this.appliedCount);
        this.counter.dataset.count = String(this.appliedCount);
      }
    }
  }
}
