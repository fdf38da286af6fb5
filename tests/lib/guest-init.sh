#!/bin/busybox sh
# SPDX-License-Identifier: BSD-3-Clause
# The test guest's /init (tests/lib/guest.py puts it in the initramfs):
# loads the modules, mounts the data disks (/disks: their device names)
# on /mnt/0, /mnt/1, ..., and obeys one-line commands on the control
# port, ttyS1, answering "OK <command> <rounds> <bytes> <trims>" or
# "ERR <command> <why>".
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m || echo "insmod $m: failed"; done
n=0
for d in $(cat /disks); do
  i=0
  while [ ! -b /dev/$d ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done
  mkdir -p /mnt/$n
  mount -t ext4 /dev/$d /mnt/$n || echo "mount /dev/$d: failed"
  n=$((n+1))
done
echo 0 0 0 > /tmp/progress

# The workload, on every data disk: whole files rewritten (new blocks,
# old ones freed), overwritten in place, appended to, deleted, renamed,
# directories and small files made (metadata, journal), sync now and
# then, fstrim (discards of the freed blocks) every few rounds.
workload() {
  r=0; bytes=0; trims=0
  while [ ! -e /tmp/stop ]; do
    r=$((r+1))
    for m in /mnt/*; do
      mkdir -p $m/w/d$((r % 7))
      f=$m/w/f$((r % 29))
      case $((r % 8)) in
      0|1|2) k=$((1 + r % 13))
             dd if=/dev/urandom of=$f bs=64k count=$k 2>/dev/null
             bytes=$((bytes + k * 65536)) ;;
      3) dd if=/dev/urandom of=$f bs=4k seek=$((r % 53)) count=4 \
            conv=notrunc 2>/dev/null
         bytes=$((bytes + 16384)) ;;
      4) dd if=/dev/urandom bs=16k count=1 2>/dev/null >> $f
         bytes=$((bytes + 16384)) ;;
      5) rm -f $f $m/w/f$(((r + 11) % 29)) ;;
      6) echo "round $r" > $m/w/d$((r % 7))/n$((r % 31))
         mv $m/w/f$(((r + 3) % 29)) $m/w/d$((r % 7))/ 2>/dev/null ;;
      7) rm -rf $m/w/d$(((r + 2) % 7)) ;;
      esac
    done
    [ $((r % 5)) = 0 ] && sync
    if [ $((r % 16)) = 0 ]; then
      for m in /mnt/*; do fstrim $m; done
      trims=$((trims + 1))
    fi
    echo $r $bytes $trims > /tmp/progress.new
    mv /tmp/progress.new /tmp/progress
  done
}

stty -F /dev/ttyS1 raw -echo 115200
exec 3<>/dev/ttyS1
say() { echo "$*" >&3; }
say READY $(uname -r)
while read -r cmd <&3; do
  case $cmd in
  start) rm -f /tmp/stop; workload & wpid=$!; say OK start $(cat /tmp/progress) ;;
  freeze) sync; ok=1
          for m in /mnt/*; do fsfreeze --freeze $m || ok=; done
          if [ -n "$ok" ]; then say OK freeze $(cat /tmp/progress)
          else say ERR freeze fsfreeze failed; fi ;;
  thaw) for m in /mnt/*; do fsfreeze --unfreeze $m; done; say OK thaw $(cat /tmp/progress) ;;
  status) say OK status $(cat /tmp/progress) ;;
  stop) touch /tmp/stop; wait $wpid; sync; say OK stop $(cat /tmp/progress) ;;
  umount) ok=1; for m in /mnt/*; do umount $m || ok=; done
          if [ -n "$ok" ]; then say OK umount; else say ERR umount failed; fi ;;
  *) say ERR $cmd unknown ;;
  esac
done
say ERR control port closed
poweroff -f
