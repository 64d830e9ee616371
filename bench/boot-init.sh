#!/bin/busybox sh
# /init of the bootable test disks' initramfs (bench/bootable.py): the banner a login
# prompt ends, on the screen and on the serial port, then nothing more.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for console in /dev/tty0 /dev/ttyS0; do
  /bin/busybox printf '\nDebian GNU/Linux (imaging boot test) %s\n\nimaging-demo login: ' \
    "$(/bin/busybox uname -r)" > "$console"
done
while :; do /bin/busybox sleep 3600; done
