/**
 * JPEG header reading: just enough to know a file's dimensions before
 * decoding it, so the crop of the pretraining transform can be drawn in
 * TypeScript and handed to the native decoder with the file's bytes.
 */

export interface JpegHeader {
  width: number;
  height: number;
  /** 1 (greyscale), 3 (YCbCr / RGB) or 4 (CMYK / YCCK). */
  components: number;
  /** Progressive (SOF2 / SOF6 / SOF10 / SOF14) rather than sequential. */
  progressive: boolean;
}

/** Whether the bytes start with a JPEG start-of-image marker (FF D8 FF). */
export function isJpeg(bytes: Uint8Array): boolean {
  return bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff;
}

// Start-of-frame markers C0..CF, except DHT (C4), JPG (C8) and DAC (CC),
// which share the range but are not frames.
function isStartOfFrame(marker: number): boolean {
  return marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc;
}

/**
 * Dimensions of a JPEG from its first start-of-frame segment, or undefined
 * when the bytes are not a JPEG or its header is damaged (the caller then
 * lets the general decoder produce the error). Reads only marker segments
 * before the frame header; no pixel data.
 */
export function readJpegHeader(bytes: Uint8Array): JpegHeader | undefined {
  if (!isJpeg(bytes)) return undefined;
  let pos = 2;
  while (pos + 4 <= bytes.length) {
    if (bytes[pos] !== 0xff) return undefined;
    const marker = bytes[pos + 1];
    if (marker === 0xff) {
      pos++; // fill byte
      continue;
    }
    // Markers without a length field.
    if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd8)) {
      pos += 2;
      continue;
    }
    if (marker === 0xd9 || marker === 0xda) return undefined; // end of image / scan before any frame
    const length = (bytes[pos + 2] << 8) | bytes[pos + 3];
    if (length < 2) return undefined;
    if (isStartOfFrame(marker)) {
      if (pos + 2 + length > bytes.length || length < 8) return undefined;
      const height = (bytes[pos + 5] << 8) | bytes[pos + 6];
      const width = (bytes[pos + 7] << 8) | bytes[pos + 8];
      const components = bytes[pos + 9];
      if (width === 0 || height === 0) return undefined; // height 0 (DNL) is not supported by the fast path
      const progressive = marker === 0xc2 || marker === 0xc6 || marker === 0xca || marker === 0xce;
      return { width, height, components, progressive };
    }
    pos += 2 + length;
  }
  return undefined;
}
