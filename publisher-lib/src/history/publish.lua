-- Publish one or more events, each to one group: assign its position, append it to the
-- history, PUBLISH it. Event i (0-based) uses KEYS[3i+1] .. KEYS[3i+3]:
-- KEYS[3i+1] position hash   <prefix>{<group>}:pos      (fields epoch, seq)
-- KEYS[3i+2] history stream  <prefix>{<group>}:history  (entry ids <seq>-1, field m)
-- KEYS[3i+3] idempotency key <prefix>{<group>}:id:<key> (value: the seq it got)
-- ARGV[1] channel <prefix>{<group>}, ARGV[2] candidate epoch (used if the group has none),
-- ARGV[3] envelope without position: those of event 0. Shared: ARGV[4] history size, ARGV[5]
-- history ttl (seconds), ARGV[6] idempotency window (seconds), ARGV[7] PUBLISH, or SPUBLISH on
-- a Redis Cluster, where the channel is a sharded channel in the keys' slot (optional with one
-- event: PUBLISH when absent). Event k >= 1: its channel, candidate epoch and envelope at
-- ARGV[3k+5], ARGV[3k+6], ARGV[3k+7].
-- Returns {epoch, seq, duplicate (0 or 1), subscribers that received it} per event, in order,
-- in one flat list. Events run in order: a key repeated in one group is a duplicate.
local events = #KEYS / 3
if events < 1 or #KEYS % 3 ~= 0 or (events > 1 and #ARGV ~= 3 * events + 4) then
  return redis.error_reply('ERR publish script: 3 keys per event, 3 arguments per event + 4')
end
local command = 'PUBLISH'
if ARGV[7] == 'SPUBLISH' then
  command = 'SPUBLISH'
end
local replies = {}
for i = 0, events - 1 do
  local k, a = 3 * i, 0
  if i > 0 then
    a = 3 * i + 4
  end
  local seen = redis.call('GET', KEYS[k + 3])
  if seen then
    local known = redis.call('HGET', KEYS[k + 1], 'epoch')
    table.insert(replies, known or '')
    table.insert(replies, tonumber(seen))
    table.insert(replies, 1)
    table.insert(replies, 0)
  else
    local epoch = redis.call('HGET', KEYS[k + 1], 'epoch')
    if not epoch then
      epoch = ARGV[a + 2]
      redis.call('DEL', KEYS[k + 2])
      redis.call('HSET', KEYS[k + 1], 'epoch', epoch, 'seq', 0)
    end
    local seq = redis.call('HINCRBY', KEYS[k + 1], 'seq', 1)
    local message = '{"epoch":"' .. epoch .. '","seq":' .. seq .. ',' .. string.sub(ARGV[a + 3], 2)
    redis.call('XADD', KEYS[k + 2], 'MAXLEN', ARGV[4], seq .. '-1', 'm', message)
    redis.call('EXPIRE', KEYS[k + 1], ARGV[5])
    redis.call('EXPIRE', KEYS[k + 2], ARGV[5])
    redis.call('SET', KEYS[k + 3], seq, 'EX', ARGV[6])
    table.insert(replies, epoch)
    table.insert(replies, seq)
    table.insert(replies, 0)
    table.insert(replies, redis.call(command, ARGV[a + 1], message))
  end
end
return replies
