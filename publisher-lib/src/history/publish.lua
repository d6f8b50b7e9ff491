-- Publish one event to one group: assign its position, append it to the history, PUBLISH it.
-- KEYS[1] position hash   <prefix>{<group>}:pos      (fields epoch, seq)
-- KEYS[2] history stream  <prefix>{<group>}:history  (entry ids <seq>-1, field m)
-- KEYS[3] idempotency key <prefix>{<group>}:id:<key> (value: the seq it got)
-- ARGV[1] channel <prefix>{<group>}, ARGV[2] candidate epoch (used if the group has none),
-- ARGV[3] envelope without position, ARGV[4] history size, ARGV[5] history ttl (seconds),
-- ARGV[6] idempotency window (seconds), ARGV[7] (optional) SPUBLISH on a Redis Cluster, where
-- the channel is a sharded channel in the keys' slot; PUBLISH when absent.
-- Returns {epoch, seq, duplicate (0 or 1), subscribers that received it}.
local seen = redis.call('GET', KEYS[3])
if seen then
  local known = redis.call('HGET', KEYS[1], 'epoch')
  return {known or '', tonumber(seen), 1, 0}
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local message = '{"epoch":"' .. epoch .. '","seq":' .. seq .. ',' .. string.sub(ARGV[3], 2)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], seq .. '-1', 'm', message)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('SET', KEYS[3], seq, 'EX', ARGV[6])
local command = 'PUBLISH'
if ARGV[7] == 'SPUBLISH' then
  command = 'SPUBLISH'
end
local subscribers = redis.call(command, ARGV[1], message)
return {epoch, seq, 0, subscribers}
