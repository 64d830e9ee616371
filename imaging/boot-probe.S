/* The accelerator probe (imaging/boot.py, PROBE_SECTOR): a boot sector that enters
   long mode as a kernel does, then writes 'K' to the first serial port. Assembled with
     as --32 -o probe.o imaging/boot-probe.S
     ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o probe.bin probe.o */
.code16
.globl _start
_start:
  cli
  xor %ax, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  mov $0x7c00, %sp
  /* Page tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD: one 2 MiB page at 0). */
  mov $0x1000, %di
  mov $0x1800, %cx
  xor %ax, %ax
  rep stosw
  movl $0x2003, 0x1000
  movl $0x3003, 0x2000
  movl $0x0083, 0x3000
  mov %cr4, %eax
  or $0x20, %eax          /* PAE */
  mov %eax, %cr4
  mov $0x1000, %eax
  mov %eax, %cr3
  mov $0xc0000080, %ecx   /* EFER */
  rdmsr
  or $0x100, %eax         /* LME */
  wrmsr
  lgdt gdtr
  mov %cr0, %eax
  or $0x80000001, %eax    /* PG, PE */
  mov %eax, %cr0
  ljmp $0x08, $long
.code64
long:
  mov $'K', %al
  mov $0x3f8, %dx
  out %al, %dx
1:
  cli
  hlt
  jmp 1b
.align 8
gdt:
  .quad 0
  .quad 0x00209a0000000000  /* 0x08: 64-bit code */
gdtr:
  .word gdtr - gdt - 1
  .long gdt
.org 510
.word 0xaa55
