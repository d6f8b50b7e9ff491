// RESP2, the Redis wire format: commands encoded as arrays of bulk strings, replies parsed. Used
// by the chaos tests' one-command client (chaos/redis.mjs) and by the console's pipelining
// publisher (frontend/console/test/topology.mjs); it imports nothing, so either can load it.

/** One command (`args`, each turned into a string) as a RESP array of bulk strings. */
export function encode(args) {
  let out = `*${args.length}\r\n`;
  for (const arg of args) {
    const text = String(arg);
    out += `$${Buffer.byteLength(text)}\r\n${text}\r\n`;
  }
  return out;
}

/**
 * Parses one RESP2 reply at `offset` of `buffer`; returns { value, offset } (an error reply's
 * value is an Error) or null if the reply is incomplete.
 */
export function parse(buffer, offset = 0) {
  const end = buffer.indexOf("\r\n", offset);
  if (end < 0) return null;
  const kind = String.fromCharCode(buffer[offset]);
  const line = buffer.subarray(offset + 1, end).toString("utf8");
  const next = end + 2;
  switch (kind) {
    case "+":
      return { value: line, offset: next };
    case "-":
      return { value: new Error(line), offset: next };
    case ":":
      return { value: Number(line), offset: next };
    case "$": {
      const length = Number(line);
      if (length < 0) return { value: null, offset: next };
      if (buffer.length < next + length + 2) return null;
      return { value: buffer.subarray(next, next + length).toString("utf8"), offset: next + length + 2 };
    }
    case "*": {
      const count = Number(line);
      if (count < 0) return { value: null, offset: next };
      const items = [];
      let at = next;
      for (let i = 0; i < count; i += 1) {
        const item = parse(buffer, at);
        if (!item) return null;
        items.push(item.value);
        at = item.offset;
      }
      return { value: items, offset: at };
    }
    default:
      throw new Error(`unexpected RESP type ${JSON.stringify(kind)}`);
  }
}
