-- Read one group's head and the history after a position.
-- KEYS[1] position hash <prefix>{<group>}:pos, KEYS[2] history stream <prefix>{<group>}:history
-- ARGV[1] candidate epoch (used if the group has none), ARGV[2] history ttl (seconds),
-- ARGV[3] epoch of the position to read after ("" = none), ARGV[4] seq of that position,
-- ARGV[5] "cursor" when that position is the caller's own delivery cursor (a gateway replica
-- filling a gap), anything else or absent when it came from a client.
-- Returns {epoch, head seq, recovered, messages}: recovered is -1 without a position, 1 when
-- messages are every event after the position up to the head (in order), 0 when they cannot be.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
local head = tonumber(redis.call('HGET', KEYS[1], 'seq'))
if ARGV[3] == '' then
  return {epoch, head, -1, {}}
end
local after = tonumber(ARGV[4])
if ARGV[3] == epoch and after ~= nil and after > head then
  if ARGV[5] ~= 'cursor' then
    -- A client's position ahead of the head proves nothing (anyone can send one): that client
    -- alone is told it did not recover, and the group is left as it is.
    return {epoch, head, 0, {}}
  end
  -- A replica delivered events this history no longer holds: it was rewound (a replica promoted
  -- after missing the last writes). Start a new epoch so no one resumes across it.
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {epoch, 0, 0, {}}
end
if ARGV[3] ~= epoch or after == nil then
  return {epoch, head, 0, {}}
end
if after == head then
  return {epoch, head, 1, {}}
end
local entries = redis.call('XRANGE', KEYS[2], (after + 1) .. '-1', '+')
if #entries == 0 or tonumber(string.match(entries[1][1], '^%d+')) ~= after + 1 then
  return {epoch, head, 0, {}}
end
local messages = {}
for i, entry in ipairs(entries) do
  messages[i] = entry[2][2]
end
return {epoch, head, 1, messages}
